"""Progress of long phases (training epochs, calibration, evaluation, teacher pretraining).

On a terminal: a tqdm bar with ETA. In a log file (stderr not a terminal): a plain line at most every
``every_s`` seconds and one at the end, never carriage-return spam.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any


class Progress:
    """``update(n)``, ``set_postfix(**values)``, ``close()``; a no-op when ``enabled`` is False."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, every_s: float = 30.0, unit: str = "it"):
        self.total, self.desc, self.enabled, self.every_s, self.unit = total, desc, enabled, every_s, unit
        self.n, self.postfix, self.t0 = 0, "", time.monotonic()
        self.last = self.t0
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every_s:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        if not self.enabled:
            return
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix, refresh=False)

    def _line(self) -> None:
        self.last = now = time.monotonic()
        elapsed = now - self.t0
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = ""
        if self.total and 0 < self.n < self.total:
            eta = f", ETA {_fmt(elapsed * (self.total - self.n) / self.n)}"
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit} in {_fmt(elapsed)}{eta}{tail}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.n:
            self._line()


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True,
             unit: str = "it") -> Iterator:
    """Iterate ``iterable`` while reporting progress (see ``Progress``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    bar = Progress(total, desc, enabled, unit=unit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.0f}s"
