"""Ray Data ingest: audio -> Parquet chunk tables, one dataset per split, plus Train-only stats.

Layout of TABLES/:
  plan.json               the inputs and feature config, and the files of every part
  <split>/part-NNNNN.parquet   one row per sentence, its C chunks in one tensor
  _meta/<split>/part-NNNNN.json  the part's sidecar (written last): rows written, rejects, the
                          digest of its inputs (items + feature config), the size of its file
  stats.json              per-mel-bin mean/std over Train frames, label mean/std over Train
  rejects.parquet         path, split, reason of every file left out
  _SUCCESS                the whole ingest finished (written last)

A part is written under a temporary name and renamed, then its sidecar. A re-run reads the inputs
again and keeps only the parts it can verify (same inputs, file of the recorded size with a
readable footer); the rest are rewritten. So a killed ingest resumes where it stopped, an added
file or a damaged part is redone, and _SUCCESS (removed at the start) means all of it was checked.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dec_ray.config import Config, FeatureConfig, reference_settings
from dec_ray.data.corpus import SPLITS, Item, Reject, list_unlabeled, read_corpus
from dec_ray.data.files import write_json
from dec_ray.data.normalization import Stats
from dec_ray.data.parts import write_part
from dec_ray.data.tables import split_files
from dec_ray.service.cluster import ensure_ray
from dec_ray.service.progress import ProgressLine

# Bytes of one sentence row: C * m * n_mels values (+ ~2 KB of frame sums and metadata).
ROW_OVERHEAD_BYTES = 2200


@dataclass
class IngestSummary:
    rows: Dict[str, int]
    rejects: int
    reject_reasons: Dict[str, int]
    tables: str

    def line(self) -> str:
        rows = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        return f"ingest: {rows} sentences; {self.rejects} rejected" + (
            " (" + ", ".join(f"{k}: {v}" for k, v in self.reject_reasons.items()) + ")" if self.rejects else "")


def rows_per_part(fc: FeatureConfig, target_mb: int) -> int:
    bytes_per_value = 2 if fc.storage_dtype == "float16" else 4
    row = fc.num_chunks * fc.chunk_frames * fc.n_mels * bytes_per_value + ROW_OVERHEAD_BYTES
    return max(1, int(target_mb * 2 ** 20 // row))


def _item_dict(it: Item, row_id: int) -> dict:
    nan_to_none = lambda v: None if v is None or math.isnan(v) else float(v)  # noqa: E731
    return {"row_id": row_id, "segment_id": it.segment_id, "split": it.split, "speaker": it.speaker,
            "path": it.path, "arousal": nan_to_none(it.arousal), "valence": nan_to_none(it.valence),
            "dominance": nan_to_none(it.dominance)}


def make_plan(items: List[Item], per_part: int, min_parts: int = 8) -> dict:
    """Deterministic parts: per split, items sorted by path, cut every ``per_part`` rows (fewer
    when a split is small, so that it still spreads over ``min_parts`` tasks).
    row_id is unique across all splits; it keys the rows in training and evaluation."""
    plan: dict = {"parts": []}
    row_id = 0
    for split in SPLITS:
        these = sorted((it for it in items if it.split == split), key=lambda it: it.path)
        size = max(1, min(per_part, -(-len(these) // min_parts)))    # this split's part size
        for start in range(0, len(these), size):
            chunk = these[start:start + size]
            plan["parts"].append({"split": split, "name": f"part-{start // size:05d}.parquet",
                                  "items": [_item_dict(it, row_id + i) for i, it in enumerate(chunk)]})
            row_id += len(chunk)
    return plan


def sidecar_path(out: str, part: dict) -> str:
    return os.path.join(out, "_meta", part["split"], part["name"].replace(".parquet", ".json"))


def _run_parts(parts: List[dict], out: str, cfg: Config) -> None:
    """Featurise and write the given parts in parallel with Ray Data (one task per part)."""
    import ray

    fc_dict = asdict(cfg.features)

    def process(row: dict) -> dict:
        fc = FeatureConfig(**fc_dict)
        part = row["part"]
        sidecar = write_part(part["items"], os.path.join(out, part["split"], part["name"]),
                             sidecar_path(out, part), fc, part_digest(part, fc_dict))
        return {"split": part["split"], "name": part["name"], "rows": sidecar["rows"]}

    ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
    # One CPU per task; Ray sets OMP_NUM_THREADS to a task's CPUs, so BLAS/OpenMP pools do not
    # oversubscribe the cores. (A per-task runtime_env would cost a fresh worker process per part.)
    ds = ds.map(process, num_cpus=cfg.ingest.num_cpus_per_task)
    bar = ProgressLine("ingest: parts written", len(parts))
    for _ in ds.iter_rows():
        bar.step()


def compute_stats(out: str, fc: FeatureConfig) -> Stats:
    """Per-bin frame mean/std and label mean/std, from the Train table only."""
    files = split_files(out, "train")
    if not files:
        raise RuntimeError("no Train sentence survived ingest: cannot compute normalisation stats")
    table = pads.dataset(files, format="parquet").to_table(
        columns=["num_frames", "frame_sum", "frame_sumsq", "logframe_sum", "logframe_sumsq",
                 "arousal", "valence", "dominance"])
    n = int(pa.compute.sum(table["num_frames"]).as_py())
    s, ss, ls, lss = (np.asarray(table[c].combine_chunks().flatten()).reshape(-1, fc.n_mels).sum(0)
                      for c in ("frame_sum", "frame_sumsq", "logframe_sum", "logframe_sumsq"))
    labels = {a: table[a].to_numpy(zero_copy_only=False) for a in ("arousal", "valence", "dominance")}
    return Stats.from_sums(n, s, ss, labels, table.num_rows, asdict(fc), (ls, lss))


def part_features(split: str, features: dict) -> dict:
    """The feature settings a part of this split is made with: ``functionals_pool`` only for the
    pool's parts, so turning it on redoes the pool's parts alone (and labeled parts made before
    the setting existed still verify)."""
    return features if split == "unlabeled" else reference_settings(features)


def part_digest(part: dict, features: dict) -> str:
    """What a part is made from: its items (files, row ids, labels) and the feature settings."""
    blob = json.dumps({"items": part["items"], "features": part_features(part["split"], features)},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def part_is_valid(out: str, part: dict, features: dict) -> bool:
    """The part's sidecar says it was made from these inputs, and its file is all there (the size
    the sidecar recorded, a readable footer with the recorded row count)."""
    try:
        with open(sidecar_path(out, part)) as f:
            side = json.load(f)
        path = os.path.join(out, part["split"], part["name"])
        if side.get("inputs_digest") != part_digest(part, features):
            return False
        if side["rows"] == 0:
            return not os.path.exists(path)
        return (os.path.getsize(path) == side["part_bytes"]
                and pq.ParquetFile(path).metadata.num_rows == side["rows"])
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return False


def _remove_stale(out: str, plan: dict) -> None:
    """Files of an earlier plan that this plan does not have (a shorter split, say)."""
    keep = {(p["split"], os.path.splitext(p["name"])[0]) for p in plan["parts"]}   # a part and its sidecar
    for split in SPLITS:
        for d in (os.path.join(out, split), os.path.join(out, "_meta", split)):
            for f in os.listdir(d):
                stem, ext = os.path.splitext(f)
                if ext in (".parquet", ".json") and f[0] != "." and (split, stem) not in keep:
                    os.remove(os.path.join(d, f))


def run_ingest(corpus: Optional[str], out: str, cfg: Config, unlabeled: Sequence[str] = ()) -> IngestSummary:
    """Read the inputs, plan, verify what an earlier run left in ``out`` against this command,
    (re)write every part that is missing, stale or damaged, then stats, rejects and, last, the
    success marker. An output made from other inputs or feature settings is refused."""
    corpus = os.path.abspath(corpus) if corpus else None       # Ray workers run in other directories
    unlabeled = [os.path.abspath(u) for u in unlabeled]
    inputs = {"corpus": corpus, "unlabeled": sorted(unlabeled)}
    features = asdict(cfg.features)
    plan_path = os.path.join(out, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            saved = json.load(f)
        if saved.get("inputs") != inputs:
            raise ValueError(f"{out} was made from other inputs ({saved.get('inputs')}); use a new output folder")
        if part_features("train", saved.get("features") or {}) != part_features("train", features):
            raise ValueError(f"{out} was made with other feature settings ({saved.get('features')}); "
                             "use a new output folder")
    items: List[Item] = []
    rejects: List[Reject] = []
    if corpus:
        items, rejects = read_corpus(corpus, cfg.ingest.min_label, cfg.ingest.max_label)
    if unlabeled:
        items += list_unlabeled(unlabeled)
    if not items:
        raise ValueError("nothing to ingest: give --corpus and/or --unlabeled")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "_SUCCESS")):
        os.remove(os.path.join(out, "_SUCCESS"))          # written again only once all is verified
    plan = make_plan(items, rows_per_part(cfg.features, cfg.ingest.target_shard_mb),
                     cfg.ingest.min_parts_per_split)
    plan.update(inputs=inputs, features=features,
                reader_rejects=[{"path": r.path, "split": r.split, "reason": r.reason} for r in rejects])
    write_json(plan_path, plan)
    for split in SPLITS:
        os.makedirs(os.path.join(out, split), exist_ok=True)
        os.makedirs(os.path.join(out, "_meta", split), exist_ok=True)
    _remove_stale(out, plan)
    todo = [p for p in plan["parts"] if not part_is_valid(out, p, features)]
    print(f"ingest: {len(plan['parts'])} parts, {len(plan['parts']) - len(todo)} verified, {len(todo)} to write")
    if todo:
        for p in todo:                                      # unverified until rewritten
            for path in (sidecar_path(out, p), os.path.join(out, p["split"], p["name"])):
                if os.path.exists(path):
                    os.remove(path)
        ensure_ray()
        _run_parts(todo, out, cfg)
        bad = [p["name"] for p in todo if not part_is_valid(out, p, features)]
        if bad:
            raise RuntimeError(f"{len(bad)} part(s) failed verification after writing: {bad[:5]}")

    rows: Dict[str, int] = {s: 0 for s in SPLITS}
    all_rejects = list(plan["reader_rejects"])
    for p in plan["parts"]:
        with open(sidecar_path(out, p)) as f:
            side = json.load(f)
        rows[p["split"]] += side["rows"]
        all_rejects += side["rejects"]

    if rows["train"]:
        stats = compute_stats(out, cfg.features)
        stats.save(os.path.join(out, "stats.json"))                 # atomic
    else:
        print("ingest: warning: no Train sentence, so no stats.json (normalisation comes from Train "
              "only); train on tables that include the labeled corpus")
    pq.write_table(pa.table({k: pa.array([r[k] for r in all_rejects], pa.string())
                             for k in ("path", "split", "reason")}), os.path.join(out, "rejects.parquet"))
    reasons: Dict[str, int] = {}
    for r in all_rejects:
        key = r["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    summary = IngestSummary(rows, len(all_rejects), reasons, out)
    write_json(os.path.join(out, "_SUCCESS"), asdict(summary))
    return summary
