"""Corpus readers: the MSP-Podcast layout (any release), a generic manifest CSV, unlabeled audio.

A reader returns the usable items and a list of rejects (path, reason) - a bad row never stops
the others. Structural problems (no labels file, a missing column) raise CorpusError at once,
before any work starts.
"""
from __future__ import annotations

import csv
import glob
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
# Split names across MSP-Podcast releases and common manifests -> our four datasets.
SPLIT_ALIASES: Dict[str, str] = {
    "train": "train", "development": "dev", "validation": "dev", "dev": "dev", "valid": "dev",
    "test1": "test", "test": "test", "unlabeled": "unlabeled",
}
SPLITS = ("train", "dev", "test", "unlabeled")
MSP_COLUMNS = ("FileName", "EmoAct", "EmoVal", "EmoDom", "Split_Set")
MANIFEST_COLUMNS = ("path", "arousal", "valence", "dominance", "split")


class CorpusError(ValueError):
    """The corpus cannot be read at all (layout or columns); nothing has been processed."""


@dataclass
class Item:
    path: str
    split: str                    # train | dev | test | unlabeled
    segment_id: str
    speaker: str = ""
    arousal: float = math.nan
    valence: float = math.nan
    dominance: float = math.nan


@dataclass
class Reject:
    path: str
    reason: str
    split: str = ""


def _float(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def check_labels(item: Item, low: float = 1.0, high: float = 7.0) -> Optional[str]:
    """Why a labeled item's attributes are unusable, or None."""
    for name in ("arousal", "valence", "dominance"):
        v = getattr(item, name)
        if math.isnan(v):
            return f"label {name} is missing or NaN"
        if not low <= v <= high:
            return f"label {name}={v} outside [{low}, {high}]"
    return None


def _read_csv(path: str, required: Sequence[str]) -> List[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise CorpusError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


def _labels(it: Item) -> tuple:
    return it.split, it.arousal, it.valence, it.dominance


def _check_rows(items: List[Item], rejects: List[Reject]) -> List[Item]:
    """One row per file. A file in two splits stops the ingest (it would leak test data into
    training); a repeated identical row is rejected; rows of one file with different labels in
    the same split are all rejected (which one is right is unknown)."""
    by_path: Dict[str, List[Item]] = {}
    for it in items:
        by_path.setdefault(it.path, []).append(it)
    splits = {p: sorted({it.split for it in rows}) for p, rows in by_path.items()}
    leaks = [(p, s) for p, s in splits.items() if len(s) > 1]
    if leaks:
        shown = "; ".join(f"{os.path.basename(p)} in {'/'.join(s)}" for p, s in leaks[:5])
        raise CorpusError(f"{len(leaks)} file(s) listed in more than one split, which would leak evaluation data "
                          f"into training: {shown}{' ...' if len(leaks) > 5 else ''}. Fix the labels file.")
    kept = []
    for path, rows in by_path.items():
        if len({_labels(it) for it in rows}) > 1:
            rejects += [Reject(path, "contradictory labels: the file is listed with different labels", it.split)
                        for it in rows]
            continue
        kept.append(rows[0])
        rejects += [Reject(path, "duplicate row: the file is listed again with the same labels", it.split)
                    for it in rows[1:]]
    return kept


def _finish(items: List[Item], rejects: List[Reject], low: float, high: float,
            ) -> Tuple[List[Item], List[Reject]]:
    good = []
    for it in _check_rows(items, rejects):
        why = None if it.split == "unlabeled" else check_labels(it, low, high)
        if why is None and not os.path.isfile(it.path):
            why = "missing file"
        if why:
            rejects.append(Reject(it.path, why, it.split))
        else:
            good.append(it)
    return good, rejects


def read_msp_podcast(root: str, low: float = 1.0, high: float = 7.0) -> Tuple[List[Item], List[Reject]]:
    """MSP-Podcast: Audios/ or Audio/, Labels/labels_consensus.csv (or the older 'concensus')."""
    audio_dir = next((os.path.join(root, d) for d in ("Audios", "Audio")
                      if os.path.isdir(os.path.join(root, d))), None)
    if audio_dir is None:
        raise CorpusError(f"{root}: no Audios/ or Audio/ folder (MSP-Podcast layout)")
    labels = next((os.path.join(root, "Labels", n) for n in ("labels_consensus.csv", "labels_concensus.csv")
                   if os.path.isfile(os.path.join(root, "Labels", n))), None)
    if labels is None:
        raise CorpusError(f"{root}: no Labels/labels_consensus.csv (or labels_concensus.csv)")
    items, rejects = [], []
    for row in _read_csv(labels, MSP_COLUMNS):
        path = os.path.join(audio_dir, row["FileName"])
        split = SPLIT_ALIASES.get(row["Split_Set"].strip().lower())
        if split is None or split == "unlabeled":
            rejects.append(Reject(path, f"unknown split name {row['Split_Set']!r}", row["Split_Set"]))
            continue
        items.append(Item(path, split, os.path.splitext(row["FileName"])[0], row.get("SpkrID", "") or "",
                          _float(row["EmoAct"]), _float(row["EmoVal"]), _float(row["EmoDom"])))
    return _finish(items, rejects, low, high)


def read_manifest(path: str, low: float = 1.0, high: float = 7.0) -> Tuple[List[Item], List[Reject]]:
    """Generic CSV: path, arousal, valence, dominance, split[, speaker]; paths relative to the CSV."""
    base = os.path.dirname(os.path.abspath(path))
    items, rejects = [], []
    for row in _read_csv(path, MANIFEST_COLUMNS):
        p = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
        split = SPLIT_ALIASES.get(row["split"].strip().lower())
        if split is None:
            rejects.append(Reject(p, f"unknown split name {row['split']!r}", row["split"]))
            continue
        items.append(Item(p, split, os.path.splitext(os.path.basename(p))[0], row.get("speaker", "") or "",
                          _float(row["arousal"]), _float(row["valence"]), _float(row["dominance"])))
    return _finish(items, rejects, low, high)


def read_corpus(spec: str, low: float = 1.0, high: float = 7.0) -> Tuple[List[Item], List[Reject]]:
    """A folder in the MSP-Podcast layout, or a manifest .csv file."""
    if os.path.isdir(spec):
        return read_msp_podcast(spec, low, high)
    if spec.endswith(".csv") and os.path.isfile(spec):
        return read_manifest(spec, low, high)
    raise CorpusError(f"{spec}: neither an MSP-Podcast folder nor a manifest .csv")


def is_audio_name(path: str) -> bool:
    return path.lower().endswith(AUDIO_EXTENSIONS)       # UPPER.WAV too


def list_unlabeled(specs: Sequence[str]) -> List[Item]:
    """Audio files from folders (searched recursively, names taken literally, extensions in any
    case), single files, or glob patterns; sorted, de-duplicated. A named file is always taken
    (a bad one is rejected later, with its reason), whatever its extension."""
    paths = set()
    for spec in specs:
        if os.path.isdir(spec):
            for d, _, files in os.walk(spec):
                paths.update(os.path.join(d, f) for f in files if is_audio_name(f))
        elif os.path.isfile(spec):
            paths.add(spec)
        else:
            matched = glob.glob(spec, recursive=True)
            if not matched:
                raise CorpusError(f"unlabeled audio {spec!r}: no folder or file of that name, and no file matches "
                                  "it as a pattern")
            paths.update(p for p in matched if os.path.isfile(p) and is_audio_name(p))
    return [Item(os.path.abspath(p), "unlabeled", os.path.splitext(os.path.basename(p))[0])
            for p in sorted(paths)]
