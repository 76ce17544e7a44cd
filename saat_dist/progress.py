"""Periodic progress lines with rate and ETA (readable in Ray and CI logs)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("saat_dist")


def _fmt(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def plural(unit: str) -> str:
    """"step" -> "steps", "query" -> "queries", "query-attack" -> "query-attacks"."""
    if unit.endswith("y") and unit[-2:-1] not in tuple("aeiou"):
        return unit[:-1] + "ies"
    return unit if unit.endswith("s") else unit + "s"


class Progress:
    """``update(n)`` counts work; a line is logged at most every ``every_s`` seconds and at the end."""

    def __init__(self, what: str, total: int, unit: str = "step", every_s: float = 10.0) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1, **extra: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            tail = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
            log.info("%s %d/%d %s (%.1f %s/s, ETA %s) %s", self.what, self.done, self.total, plural(self.unit),
                     rate, self.unit, _fmt(eta), tail)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
