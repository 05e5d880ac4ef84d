"""Progress of long loops that reads well on a terminal *and* in a log file.

On a terminal (stderr is a TTY) a rich progress bar; otherwise (CI, nohup, a job scheduler) one
plain line at the start, then at most every ``interval`` seconds, and at the end::

    distil: 120/300 (40%) | L 0.0612  L_z 0.0598  L_f 1.31 | 2.31 it/s | elapsed 0:00:52 | ETA 0:01:18

``update(done, **fields)`` sets the count and the fields shown after it.
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, label: str, total: int, *, start: int = 0, enabled: bool = True, interval: float = 10.0,
                 stream=None, unit: str = "it"):
        self.label, self.total, self.start, self.unit = label, int(total), int(start), unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interval = interval
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.fields = start, ""
        self._t0 = self._last = None
        self._bar = self._task = None

    def __enter__(self) -> "Progress":
        self._t0 = time.perf_counter()
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self._bar = RichProgress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.start, info="")
        elif self.enabled:
            self._print()
        return self

    def update(self, done: int, **fields) -> None:
        self.done = int(done)
        if fields:
            self.fields = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, info=self.fields)
        elif self.enabled and (time.perf_counter() - self._last >= self.interval or self.done >= self.total):
            self._print()

    def _print(self) -> None:
        now = time.perf_counter()
        self._last = now
        elapsed = now - self._t0
        n = self.done - self.start
        rate = n / elapsed if elapsed > 0 and n > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else None
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.label}: {self.done}/{self.total} ({pct:.0f}%)"]
        if self.fields:
            parts.append(self.fields)
        parts.append(f"{rate:.3g} {self.unit}/s" if rate else "starting")
        parts.append(f"elapsed {_clock(elapsed)}")
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and self.done < self.total and exc[0] is None:
            self._print()
