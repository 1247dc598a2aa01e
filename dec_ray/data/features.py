"""Mel power spectrogram and the method's dynamic chunking.

mel: librosa.feature.melspectrogram(n_fft=512, hop=256, n_mels=128), power 2, no log, shape (T, 128).
chunking: C chunks of m frames; step = floor((T - m) / (C - 1)); chunk k = frames
[k * step, k * step + m). Overlap grows as clips get shorter; there is no zero padding.
"""
from __future__ import annotations

import numpy as np


class ShortClipError(Exception):
    """A clip shorter than one chunk under the 'reject' policy."""


# every librosa setting the mel takes beside the configured ones, named (librosa's defaults, the
# official code's): what export's contract.json states, so no reader depends on a library default
MEL_FIXED = {"power": 2.0, "window": "hann", "center": True, "fmin": 0.0, "htk": False, "norm": "slaney"}


def mel_settings(sample_rate: int, n_fft: int) -> dict:
    """MEL_FIXED with the values that follow from the configured ones (win_length, fmax)."""
    return {**MEL_FIXED, "win_length": n_fft, "fmax": sample_rate / 2.0}


def mel_spectrogram(y: np.ndarray, sample_rate: int = 16000, n_fft: int = 512,
                    hop_length: int = 256, n_mels: int = 128, pad_mode: str = "reflect") -> np.ndarray:
    """``pad_mode`` pads the signal's ends for the centred first and last frames: 'reflect' as
    the official code's librosa 0.7 did, 'constant' (zeros) as librosa >= 0.10 does by default."""
    import librosa
    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                         n_mels=n_mels, pad_mode=pad_mode, **mel_settings(sample_rate, n_fft))
    return mel.T.astype(np.float32)


def warm_up() -> None:
    """Compile librosa's numba functions into librosa's on-disk cache, once, at install (Makefile,
    docker/Dockerfile). A fresh install compiles them at first use, 18-28 s per process on 2
    cores, and the first ingest's Ray tasks would all do it at the same time."""
    mel_spectrogram(np.ones(16000, np.float32))


def chunk_starts(num_frames: int, chunk_frames: int = 62, num_chunks: int = 11) -> np.ndarray:
    """First frame of each chunk: k * floor((T - m) / (C - 1))."""
    if num_frames < chunk_frames:
        raise ShortClipError(f"{num_frames} frames < one chunk of {chunk_frames}")
    step = (num_frames - chunk_frames) // (num_chunks - 1)
    return np.arange(num_chunks) * step


def repeat_to_length(mel: np.ndarray, chunk_frames: int) -> np.ndarray:
    """The 'repeat' short-clip policy: tile the clip's frames until it fills one chunk."""
    reps = -(-chunk_frames // mel.shape[0])
    return np.concatenate([mel] * reps, axis=0)


def make_chunks(mel: np.ndarray, chunk_frames: int = 62, num_chunks: int = 11,
                short_clip_policy: str = "repeat") -> np.ndarray:
    """(T, n_mels) -> (C, m, n_mels)."""
    if mel.shape[0] < chunk_frames:
        if short_clip_policy != "repeat" or mel.shape[0] == 0:
            raise ShortClipError(f"too short: {mel.shape[0]} frames < one chunk of {chunk_frames}")
        mel = repeat_to_length(mel, chunk_frames)
    starts = chunk_starts(mel.shape[0], chunk_frames, num_chunks)
    return np.stack([mel[s:s + chunk_frames] for s in starts])
