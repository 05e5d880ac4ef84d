"""Progress of long loops: a rich bar on a terminal, and clean stops on Ctrl-C.

:class:`TrainProgress` shows step, losses, it/s and ETA on the main process; :class:`StopFlag`
turns the first SIGINT into a request to stop after the current step (the run saves a checkpoint),
a second one aborts at once.
"""
from __future__ import annotations

import signal
import threading
import time

__all__ = ["TrainProgress", "StopFlag", "is_main_process"]


class TrainProgress:
    """Rich progress bar on the main process (step, losses, it/s, ETA); a no-op elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]distil"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.bar.add_task("train", total=total, completed=start, losses="", rate="")
        self.t0, self.n = time.perf_counter(), 0

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, rec: dict) -> None:
        if self.bar is None:
            return
        self.n += 1
        rate = self.n / max(1e-9, time.perf_counter() - self.t0)
        losses = f"L {rec['loss']:.4g}  L_z {rec['l_z']:.4g}  L_f {rec['l_f']:.4g}" + (
            f"  skipped {rec['skipped_total']}" if rec["skipped_total"] else ""
        )
        self.bar.update(self.task, completed=step, losses=losses, rate=f"{rate:.2f} it/s")


class StopFlag:
    """SIGINT → request a clean stop (checkpoint, then return); a second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def is_main_process() -> bool:
    """True on the main process (or when not launched distributed)."""
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # pragma: no cover
        return True
