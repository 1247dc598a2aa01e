"""Writing a file so that a reader sees the old content or the new one, never half of it: write a
hidden temporary file next to it (Parquet readers skip names that start with a dot), then rename
it over the target (atomic on POSIX filesystems). Every output the job writes goes through here."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write to; renamed to ``path`` when the block succeeds, removed if not."""
    d, name = os.path.split(path)
    tmp = os.path.join(d, "." + name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj, indent: int = 1) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
