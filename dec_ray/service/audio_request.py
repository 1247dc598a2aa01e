"""An HTTP request's audio, bounded: the body read up to a cap, an upload taken out of a multipart
form, the header checked (rate, channels, duration) before a sample is decoded, and the decoding
stopped at the duration cap whatever the header claims. Every refusal is a ``BadAudio`` with the
HTTP status and a reason; nothing here knows Ray."""
from __future__ import annotations

import email.parser
import email.policy
import io
from typing import AsyncIterable, Optional

import numpy as np
import soundfile as sf

from dec_ray.config import ServeConfig
from dec_ray.data.audio import MAX_CHANNELS

FORMATS = "wav, flac, ogg"


class BadAudio(Exception):
    """A request the model cannot score: ``status`` is the HTTP status, str(e) the reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(status, reason)          # both in args: the handle's caller unpickles it
        self.status, self.reason = status, reason

    def __str__(self) -> str:
        return self.reason


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:.1f} MB"


async def read_body(chunks: AsyncIterable[bytes], limits: ServeConfig, content_length: Optional[str] = None) -> bytes:
    """The request body, or BadAudio(413) as soon as it is known to exceed the cap: from its
    Content-Length before a byte is read, else once the bytes read pass it (chunked uploads)."""
    cap = limits.max_body_bytes
    if content_length is not None and content_length.isdigit() and int(content_length) > cap:
        raise BadAudio(413, f"request body {_mb(int(content_length))}: at most {_mb(cap)} (max_body_mb)")
    parts, n = [], 0
    async for part in chunks:
        n += len(part)
        if n > cap:
            raise BadAudio(413, f"request body over {_mb(cap)} (max_body_mb)")
        parts.append(part)
    return b"".join(parts)


def uploaded_file(body: bytes, content_type: str) -> bytes:
    """A multipart/form-data body (``curl -F file=@clip.wav``) -> the bytes of its file (the part
    with a filename, else the only part); any other body is the file itself."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    parts = [p for p in msg.iter_parts()] if msg.is_multipart() else []
    files = [p for p in parts if p.get_filename()] or parts
    if len(files) != 1:
        raise BadAudio(400, f"multipart form with {len(files)} files: upload one audio file (-F file=@clip.wav)")
    return files[0].get_payload(decode=True) or b""


def decode_bounded(body: bytes, limits: ServeConfig):
    """Audio file bytes -> (samples (n, channels) float32, rate), or BadAudio: 400 empty, 413 over
    the body cap (bytes a handle's caller passed), 415 not audio, 422 a rate, channel count or
    duration out of bounds (from the header, in milliseconds) or audio that breaks off. At most
    ``max_duration_s`` of samples are ever decoded."""
    if not body:
        raise BadAudio(400, f"empty request: POST the bytes of an audio file ({FORMATS})")
    if len(body) > limits.max_body_bytes:
        raise BadAudio(413, f"audio of {_mb(len(body))}: at most {_mb(limits.max_body_bytes)} (max_body_mb)")
    try:
        info = sf.info(io.BytesIO(body))
    except Exception as e:                       # soundfile's errors for bytes that are no audio
        raise BadAudio(415, f"not audio soundfile can read ({FORMATS}): {str(e).splitlines()[0][:160]}")
    sr, channels = int(info.samplerate), int(info.channels)
    if not limits.min_sample_rate <= sr <= limits.max_sample_rate:
        raise BadAudio(422, f"sample rate {sr} Hz: between {limits.min_sample_rate} and {limits.max_sample_rate} "
                            "(min_sample_rate, max_sample_rate)")
    if channels > MAX_CHANNELS:
        raise BadAudio(422, f"{channels} channels: at most {MAX_CHANNELS}")
    max_frames = int(limits.max_duration_s * sr)
    if 0 < info.frames < 2 ** 62 and info.frames > max_frames:      # a stream of unknown length reads on
        raise BadAudio(422, f"{info.frames / sr:.1f} s of audio: at most {limits.max_duration_s:g} s (max_duration_s)")
    try:
        data, _ = sf.read(io.BytesIO(body), frames=max_frames + 1, dtype="float32", always_2d=True)
    except Exception as e:
        raise BadAudio(422, f"corrupt or truncated audio: {str(e).splitlines()[0][:160]}")
    if len(data) > max_frames:
        raise BadAudio(422, f"more than {limits.max_duration_s:g} s of audio (max_duration_s)")
    return np.ascontiguousarray(data), sr
