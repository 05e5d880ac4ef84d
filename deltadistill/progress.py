"""Progress of training, and clean stops on Ctrl-C.

:class:`TrainProgress` shows step, losses, it/s and ETA on the main process (a bar on a terminal,
plain lines in a log: :mod:`attnprobe.core.progress`); :class:`StopFlag`
turns the first SIGINT into a request to stop after the current step (the run saves a checkpoint),
a second one aborts at once.
"""
from __future__ import annotations

import signal
import threading

__all__ = ["TrainProgress", "StopFlag", "is_main_process"]


class TrainProgress:
    """Training progress on the main process (step, losses, it/s, ETA); a no-op elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int):
        from attnprobe.core.progress import Progress

        self.bar = Progress("distil", total, start=start, enabled=enabled, unit="it")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, step: int, rec: dict) -> None:
        fields = {"L": rec["loss"], "L_z": rec["l_z"], "L_f": rec["l_f"]}
        if rec["skipped_total"]:
            fields["skipped"] = rec["skipped_total"]
        self.bar.update(step, **fields)


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
