"""Ray Data ingest: audio -> Parquet chunk tables, one dataset per split, plus Train-only stats.

Layout of TABLES/:
  plan.json               the files of every part (fixed on the first run, reused on re-runs)
  features.yaml           the feature config the tables were made with
  <split>/part-NNNNN.parquet   one row per sentence, its C chunks in one tensor
  _meta/<split>/part-NNNNN.json  the part's sidecar: rows written, rejects (written last)
  stats.json              per-mel-bin mean/std over Train frames, label mean/std over Train
  rejects.parquet         path, split, reason of every file left out
  _SUCCESS                the whole ingest finished (written last)

A part is written under a temporary name and renamed, then its sidecar; a re-run skips parts
whose sidecar exists, so a killed ingest resumes where it stopped and nothing partial looks done.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from dec_ray.config import Config, FeatureConfig
from dec_ray.corpus import SPLITS, Item, Reject, list_unlabeled, read_corpus
from dec_ray.featurize import write_part
from dec_ray.normalization import Stats
from dec_ray.raycluster import ensure_ray

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


def split_files(tables: str, split: str) -> List[str]:
    """The Parquet files of one split (sorted); empty when the split has no rows."""
    d = os.path.join(tables, split)
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet") and f[0] != ".")


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _run_parts(parts: List[dict], out: str, cfg: Config) -> None:
    """Featurise and write the given parts in parallel with Ray Data (one task per part)."""
    import ray

    fc_dict = asdict(cfg.features)

    def process(row: dict) -> dict:
        fc = FeatureConfig(**fc_dict)
        part = row["part"]
        sidecar = write_part(part["items"], os.path.join(out, part["split"], part["name"]),
                             sidecar_path(out, part), fc)
        return {"split": part["split"], "name": part["name"], "rows": sidecar["rows"]}

    ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=len(parts))
    # One CPU per task; Ray sets OMP_NUM_THREADS to a task's CPUs, so BLAS/OpenMP pools do not
    # oversubscribe the cores. (A per-task runtime_env would cost a fresh worker process per part.)
    ds = ds.map(process, num_cpus=cfg.ingest.num_cpus_per_task)
    for _ in ds.iter_rows():
        pass


def compute_stats(out: str, fc: FeatureConfig) -> Stats:
    """Per-bin frame mean/std and label mean/std, from the Train table only."""
    files = split_files(out, "train")
    if not files:
        raise RuntimeError("no Train sentence survived ingest: cannot compute normalisation stats")
    table = pads.dataset(files, format="parquet").to_table(
        columns=["num_frames", "frame_sum", "frame_sumsq", "arousal", "valence", "dominance"])
    n = int(pa.compute.sum(table["num_frames"]).as_py())
    s = np.asarray(table["frame_sum"].combine_chunks().flatten()).reshape(-1, fc.n_mels).sum(0)
    ss = np.asarray(table["frame_sumsq"].combine_chunks().flatten()).reshape(-1, fc.n_mels).sum(0)
    labels = {a: table[a].to_numpy(zero_copy_only=False) for a in ("arousal", "valence", "dominance")}
    return Stats.from_sums(n, s, ss, labels, table.num_rows, asdict(fc))


def run_ingest(corpus: Optional[str], out: str, cfg: Config, unlabeled: Sequence[str] = ()) -> IngestSummary:
    """Plan (or reuse the plan), write missing parts, then stats, rejects and the success marker."""
    os.makedirs(out, exist_ok=True)
    plan_path = os.path.join(out, "plan.json")
    feat_path = os.path.join(out, "features.yaml")
    if os.path.exists(plan_path):
        with open(feat_path) as f:
            saved = yaml.safe_load(f)
        if saved != asdict(cfg.features):
            raise ValueError(f"{out} was made with other feature settings ({feat_path}); "
                             "use a new output folder")
        with open(plan_path) as f:
            plan = json.load(f)
        print(f"ingest: resuming {out}")
    else:
        items: List[Item] = []
        rejects: List[Reject] = []
        if corpus:
            items, rejects = read_corpus(corpus, cfg.ingest.min_label, cfg.ingest.max_label)
        if unlabeled:
            items += list_unlabeled(unlabeled)
        if not items:
            raise ValueError("nothing to ingest: give --corpus and/or --unlabeled")
        plan = make_plan(items, rows_per_part(cfg.features, cfg.ingest.target_shard_mb),
                         cfg.ingest.min_parts_per_split)
        plan["reader_rejects"] = [{"path": r.path, "split": "", "reason": r.reason} for r in rejects]
        with open(feat_path, "w") as f:
            yaml.safe_dump(asdict(cfg.features), f)
        _write_json(plan_path, plan)

    for split in SPLITS:
        os.makedirs(os.path.join(out, split), exist_ok=True)
        os.makedirs(os.path.join(out, "_meta", split), exist_ok=True)
    todo = [p for p in plan["parts"] if not os.path.exists(sidecar_path(out, p))]
    done = len(plan["parts"]) - len(todo)
    print(f"ingest: {len(plan['parts'])} parts, {done} already done, {len(todo)} to write")
    if todo:
        ensure_ray()
        _run_parts(todo, out, cfg)

    rows: Dict[str, int] = {s: 0 for s in SPLITS}
    all_rejects = list(plan.get("reader_rejects", []))
    for p in plan["parts"]:
        with open(sidecar_path(out, p)) as f:
            side = json.load(f)
        rows[p["split"]] += side["rows"]
        all_rejects += side["rejects"]

    if rows["train"]:
        stats = compute_stats(out, cfg.features)
        stats.save(os.path.join(out, "stats.json.tmp"))
        os.replace(os.path.join(out, "stats.json.tmp"), os.path.join(out, "stats.json"))
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
    _write_json(os.path.join(out, "_SUCCESS"), asdict(summary))
    return summary


def is_complete(tables: str) -> bool:
    return os.path.exists(os.path.join(tables, "_SUCCESS"))
