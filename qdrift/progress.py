"""Progress reporting that reads well in a terminal and in a cluster job's log file.

On a terminal this is tqdm. Elsewhere (Slurm logs, CI, pipes) tqdm's carriage-return updates turn
into hundreds of glued fragments, so a bar becomes one log line per interval
(`QDRIFT_PROGRESS_INTERVAL` seconds, default 30) plus one when it ends. Nested bars (`nested=True`,
work inside an outer bar) are shown on a terminal only.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("qdrift")


def interactive() -> bool:
    """A terminal bar; torchrun's ranks after the first share rank 0's terminal, so they log lines."""
    return sys.stderr.isatty() and os.environ.get("RANK", "0") == "0"


def interval() -> float:
    try:
        return float(os.environ.get("QDRIFT_PROGRESS_INTERVAL", "30"))
    except ValueError:
        return 30.0


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it",
             nested: bool = False, disable: bool = False):
    """A progress bar over `iterable` (or a manual one with `total` and `.update(n)`)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if interactive():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=not nested, disable=disable)
    return LogProgress(iterable, desc=desc, total=total, unit=unit, disable=disable or nested)


class LogProgress:
    """tqdm's interface (iterate, update, close, context manager) writing periodic log lines."""

    def __init__(self, iterable=None, *, desc: str, total: int | None, unit: str = "it", disable: bool = False):
        self.iterable, self.desc, self.total, self.unit, self.disable = iterable, desc, total, unit, disable
        self.n = self.reported = 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= interval():
            self.last = now
            self._report(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.reported:      # the last periodic line may already say it all
                self._report(time.monotonic(), done=True)

    def _report(self, now: float, done: bool = False) -> None:
        self.reported = self.n
        if self.disable:
            return
        elapsed = now - self.start
        if self.total:
            left = elapsed / self.n * (self.total - self.n) if self.n and not done else 0.0
            pct = 100.0 * self.n / self.total
            log.info("%s: %d/%d %s (%.0f%%), %s elapsed, %s left", self.desc, self.n, self.total, self.unit, pct,
                     hms(elapsed), hms(left))
        else:
            log.info("%s: %d %s, %s elapsed", self.desc, self.n, self.unit, hms(elapsed))


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
