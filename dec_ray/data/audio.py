"""Decode audio to 16 kHz mono, peak-normalised, as the official feat_extract.py does.

Any rate, any channel count, any subtype soundfile reads (wav, flac, 24-bit, float). Problems
raise AudioError with a short reason, so that callers can reject the file and go on.
"""
from __future__ import annotations

import numpy as np
import soundfile as sf


class AudioError(Exception):
    """A file that cannot become a feature matrix; str(e) is the reason for the rejects table."""


MAX_CHANNELS = 16      # a 2-D array with at most this many rows and more columns is channels-first


def prepare_signal(data: np.ndarray, sr: int, sample_rate: int = 16000, silence_peak: float = 1e-4,
                   min_duration_s: float = 0.0, recorded: bool = False):
    """Samples of any layout ((n,), (n, channels) or (channels, n)) at rate ``sr`` -> mono at
    ``sample_rate``, peak-normalised. The same checks for a file and for an array. ``recorded``:
    (those samples, the mono signal at ``sample_rate`` before the peak normalisation: what the
    functionals are computed from; exactly, as openSMILE's voicing thresholds turn on the last bit)."""
    data = np.asarray(data, dtype=np.float32)
    if not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise AudioError(f"bad sample rate: {sr!r}")
    if data.ndim == 2 and data.shape[0] <= MAX_CHANNELS < data.shape[1]:
        data = data.T
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2:
        raise AudioError(f"bad layout: {data.ndim}-d samples (give (n,), (n, channels) or (channels, n))")
    if data.size == 0:
        raise AudioError("empty: no samples")
    y = data.mean(axis=1)
    if not np.all(np.isfinite(y)):
        raise AudioError("corrupt: non-finite samples")
    if sr != sample_rate:
        import librosa  # imported lazily: numba start-up is slow and most callers need no resampling
        y = librosa.resample(y, orig_sr=int(sr), target_sr=sample_rate, res_type="soxr_hq")
    if len(y) < min_duration_s * sample_rate:
        raise AudioError(f"too short: {len(y) / sample_rate:.3f}s < {min_duration_s}s")
    peak = float(np.max(np.abs(y)))
    if peak < silence_peak:
        raise AudioError(f"silent: peak amplitude {peak:.2e}")
    y, mono = (y / peak).astype(np.float32), y.astype(np.float32)
    return (y, mono) if recorded else y


def load_audio(path: str, sample_rate: int = 16000, silence_peak: float = 1e-4,
               min_duration_s: float = 0.0, recorded: bool = False):
    """Read, mix down to mono, resample to ``sample_rate`` and peak-normalise to [-1, 1]
    (``recorded``: and the signal before the peak normalisation, see ``prepare_signal``)."""
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise AudioError("missing file")
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for corrupt input
        raise AudioError(f"unreadable: {str(e).splitlines()[0][:160]}")
    return prepare_signal(data, sr, sample_rate, silence_peak, min_duration_s, recorded)
