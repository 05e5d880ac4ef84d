"""Input and output helpers shared by attnprobe and deltadistill.

- :func:`read_prompts`: the one reader of prompt files (one prompt per line, ``#`` comments).
- :func:`atomic_write_text`: write a file through a temporary sibling and a rename.
- :func:`replace_dir` / :func:`staged_output_dir`: build an output folder in a temporary sibling,
  then swap it into place. Nothing the user already has is touched until the new output is
  complete; an existing, non-empty folder is only replaced with ``overwrite=True``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path


def read_prompts(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[str]:
    """Non-blank lines of a UTF-8 text file, ``#`` comment lines skipped.

    Raises ``error`` (ValueError by default; callers pass their own subclass) with a one-line
    message when the file is missing, unreadable, not UTF-8, empty, or holds only comments.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"prompt file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise error(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise error(f"prompt file {path} is empty: it holds no prompts (one prompt per line; '#' starts a comment)")
    return prompts


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``final``; an existing ``final`` is moved aside first
    and deleted only after the swap, so a crash leaves either the old or the new folder."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return final
    backup = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(final, backup)
    os.replace(tmp, final)
    shutil.rmtree(backup, ignore_errors=True)
    return final


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
    replace_dir(tmp, out)
