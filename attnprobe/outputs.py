"""Atomic output folders: build in a temporary sibling, then swap into place.

Nothing the user already has is touched until the new output is complete; an existing,
non-empty folder is only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Raise FileExistsError if ``out`` exists and is not empty and overwrite is off."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """``with staged_output_dir("runs/x") as tmp:`` write into ``tmp``; on success it becomes ``runs/x``."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
