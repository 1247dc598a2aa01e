"""Progress of long work as log lines (a progress bar that reads well in a job's log): a line
at most every ``every_s`` seconds, and one at the end, with the count, share, time and time left."""
from __future__ import annotations

import time
from typing import Callable


class ProgressLine:
    def __init__(self, what: str, total: int, every_s: float = 10.0, say: Callable[[str], None] = None):
        self.what, self.total, self.every_s = what, total, every_s
        self.say = say or (lambda line: print(line, flush=True))
        self.done, self.t0 = 0, time.monotonic()
        self.last = self.t0

    def line(self) -> str:
        spent = time.monotonic() - self.t0
        share = self.done / self.total if self.total else 1.0
        left = f", about {spent / self.done * (self.total - self.done):.0f} s left" \
            if 0 < self.done < self.total and 10 * self.done >= self.total else ""   # once the pace is known
        return f"{self.what}: {self.done}/{self.total} ({100 * share:.0f} %), {spent:.0f} s{left}"

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            self.say(self.line())
