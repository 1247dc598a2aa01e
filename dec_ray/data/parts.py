"""One file -> one table row; a list of files -> one Parquet part. Plain Python, no Ray.

The Parquet part is the unit of parallelism and of resumption: it is written to a temporary
name and renamed, and its sidecar JSON (row count, rejects) is written last. A part whose sidecar
exists is complete; anything else is redone.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dec_ray.config import FeatureConfig
from dec_ray.data.audio import AudioError, load_audio
from dec_ray.data.features import ShortClipError, make_chunks, mel_spectrogram
from dec_ray.data.functionals import EGEMAPS_DIM, egemaps
from dec_ray.data.files import atomic_path, write_json
from dec_ray.data.normalization import LOG_EPS, FrameSums

FLOAT16_MAX = 65504.0


def as_stored(chunks: np.ndarray, fc: FeatureConfig):
    """Chunks in the tables' dtype (float16 saturates at its maximum); returns them and how many
    values saturated. Training reads exactly these values, and inference computes the same."""
    if fc.storage_dtype != "float16":
        return chunks.astype(np.float32), 0
    return np.minimum(chunks, FLOAT16_MAX).astype(np.float16), int((chunks > FLOAT16_MAX).sum())


def wants_functionals(fc: FeatureConfig, split: str) -> bool:
    """Whether a row of this split gets its functionals: the labeled splits' (the references read
    them), the pool's only with ``features.functionals_pool`` (an eGeMAPS teacher reads them)."""
    return fc.functionals != "none" and (split != "unlabeled" or fc.functionals_pool)


def featurize_file(path: str, fc: FeatureConfig, functionals: bool = True) -> Dict:
    """Raw (un-normalised) chunks and frame statistics of one file, and, with ``functionals``, its
    functionals (the references' input, ``features.functionals``). Raises AudioError/ShortClipError.

    The mel features are of the peak-normalised signal (the official code's); the eGeMAPS
    functionals of the signal as recorded (mono, 16 kHz, not peak-normalised), as the field
    computes them: peak normalisation divides each clip by its own loudest sample and so removes
    the level differences within a speaker that carry arousal (on RAVDESS at 1/4 of the labels,
    per-speaker normalised eGeMAPS: test CCC 0.68 from the peak-normalised signal, 0.75 as
    recorded)."""
    y, recorded = load_audio(path, fc.sample_rate, fc.silence_peak, fc.min_duration_s, recorded=True)
    f = featurize_signal(y, fc)
    if functionals and fc.functionals == "egemaps":
        f["egemaps"] = egemaps(recorded, fc.sample_rate)
    return f


def featurize_signal(y: np.ndarray, fc: FeatureConfig) -> Dict:
    """The same for decoded samples (16 kHz mono, peak-normalised)."""
    mel = mel_spectrogram(y, fc.sample_rate, fc.n_fft, fc.hop_length, fc.n_mels, fc.pad_mode)
    chunks = make_chunks(mel, fc.chunk_frames, fc.num_chunks, fc.short_clip_policy)
    stored = as_stored(mel, fc)[0].astype(np.float32)          # the log of what training reads
    sums, logs = FrameSums.of(mel), FrameSums.of(np.log(stored + np.float32(LOG_EPS)))
    return {"chunks": chunks, "num_frames": mel.shape[0], "duration": len(y) / fc.sample_rate,
            "frame_sum": sums.s, "frame_sumsq": sums.ss, "logframe_sum": logs.s, "logframe_sumsq": logs.ss}


def table_schema(fc: FeatureConfig) -> pa.Schema:
    value = pa.float16() if fc.storage_dtype == "float16" else pa.float32()
    extra = [("egemaps", pa.list_(pa.float32(), EGEMAPS_DIM))] if fc.functionals == "egemaps" else []
    return pa.schema([
        ("row_id", pa.int64()), ("segment_id", pa.string()), ("split", pa.string()),
        ("speaker", pa.string()), ("path", pa.string()), ("duration", pa.float32()),
        ("num_frames", pa.int32()),
        ("arousal", pa.float32()), ("valence", pa.float32()), ("dominance", pa.float32()),
        ("chunks", pa.fixed_shape_tensor(value, (fc.num_chunks, fc.chunk_frames, fc.n_mels))),
        ("frame_sum", pa.list_(pa.float64(), fc.n_mels)),
        ("frame_sumsq", pa.list_(pa.float64(), fc.n_mels)),
        ("logframe_sum", pa.list_(pa.float64(), fc.n_mels)),          # the same of log-mel (model.input)
        ("logframe_sumsq", pa.list_(pa.float64(), fc.n_mels)),
    ] + extra)


def _tensor_column(chunks: np.ndarray, typ: pa.DataType) -> pa.Array:
    flat = pa.array(chunks.reshape(-1), type=typ.value_type)
    size = int(np.prod(typ.shape))
    return pa.ExtensionArray.from_storage(typ, pa.FixedSizeListArray.from_arrays(flat, size))


def write_part(items: List[Dict], part_path: str, sidecar_path: str, fc: FeatureConfig,
               inputs_digest: str = "") -> Dict:
    """Featurise ``items`` (dicts with row_id, segment_id, split, speaker, path, labels) into one
    Parquet file at ``part_path``; write and return the sidecar last: rows, rejects, the digest of
    the inputs it was made from and the size of the file written (a re-run verifies both)."""
    schema = table_schema(fc)
    cols: Dict[str, list] = {name: [] for name in schema.names}
    chunk_list, rejects, overflow = [], [], 0
    for it in items:
        try:
            f = featurize_file(it["path"], fc, wants_functionals(fc, it["split"]))
        except (AudioError, ShortClipError) as e:
            rejects.append({"path": it["path"], "split": it["split"], "reason": str(e)})
            continue
        except Exception as e:  # anything else a decoder may throw: reject, never crash the part
            rejects.append({"path": it["path"], "split": it["split"],
                            "reason": f"unreadable: {type(e).__name__}: {str(e)[:160]}"})
            continue
        c, saturated = as_stored(f["chunks"], fc)
        overflow += saturated
        chunk_list.append(c)
        for k in ("row_id", "segment_id", "split", "speaker", "path", "arousal", "valence", "dominance"):
            cols[k].append(it.get(k))
        cols["duration"].append(f["duration"])
        cols["num_frames"].append(f["num_frames"])
        cols["frame_sum"].append(f["frame_sum"])
        cols["frame_sumsq"].append(f["frame_sumsq"])
        cols["logframe_sum"].append(f["logframe_sum"])
        cols["logframe_sumsq"].append(f["logframe_sumsq"])
        if "egemaps" in cols:
            cols["egemaps"].append(f.get("egemaps"))           # null where not computed (the pool)
    if chunk_list:
        arrays = []
        for field in schema:
            if field.name == "chunks":
                arrays.append(_tensor_column(np.stack(chunk_list), field.type))
            else:
                arrays.append(pa.array(cols[field.name], type=field.type))
        table = pa.Table.from_arrays(arrays, schema=schema)
        with atomic_path(part_path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
    sidecar = {"rows": len(chunk_list), "rejects": rejects, "float16_overflow": overflow,
               "inputs_digest": inputs_digest,
               "part_bytes": os.path.getsize(part_path) if chunk_list else 0}
    write_json(sidecar_path, sidecar, indent=None)
    return sidecar
