"""The field's reference features: the 88 eGeMAPS v02 functionals of a whole clip (openSMILE,
through the `opensmile` wheel, which bundles its binary). Computed at ingest from the decoded
signal as recorded (16 kHz mono; not peak-normalised, see ``parts.featurize_file``), one vector
per sentence, stored as the tables' ``egemaps`` column. No Ray here.
"""
from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

EGEMAPS_DIM = 88


@lru_cache(maxsize=1)
def _smile():
    import opensmile
    return opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                           feature_level=opensmile.FeatureLevel.Functionals)


def egemaps(y: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """(88,) float32 eGeMAPS v02 functionals of one clip. openSMILE gives NaN for what a clip
    lacks (no voiced frame: no F0 statistics); the references map NaN to 0 after the z-score."""
    with warnings.catch_warnings():      # "Segment too short, filling with NaN": the NaN is the answer
        warnings.simplefilter("ignore", UserWarning)
        out = _smile().process_signal(np.asarray(y, dtype=np.float32), sample_rate).to_numpy()
    if out.shape != (1, EGEMAPS_DIM):
        raise ValueError(f"openSMILE returned {out.shape} eGeMAPS values, expected (1, {EGEMAPS_DIM})")
    return out[0].astype(np.float32)
