"""Input and output helpers shared by attnprobe and deltadistill.

- :func:`read_prompts`: the one reader of prompt files (one prompt per line, ``#`` comments).
- :func:`atomic_write_text`: write a file through a temporary sibling and a rename.
- :func:`replace_dir` / :func:`staged_output_dir`: build an output folder in a temporary sibling,
  then swap it into place. Nothing the user already has is touched until the new output is
  complete; an existing, non-empty folder is only replaced with ``overwrite=True``.
- :func:`claim_output`: an exclusive claim on an output path for the duration of a run (a lock
  file beside it, created atomically, naming the owner's pid): a second run writing to the same
  place fails at once instead of silently replacing the first one's output. Claims and partial
  folders of killed runs (dead pids) are cleaned up by the next run.
- :func:`check_writable`: fail before any expensive work when an output cannot be written.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from pathlib import Path

from attnprobe.core.errors import UserError


class OutputBusyError(UserError, FileExistsError):
    """Another live run is writing the same output."""


def file_mode() -> int:
    """0o666 minus the process umask: the mode a normally created file gets."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def dir_mode() -> int:
    """0o777 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


_HOST = socket.gethostname().replace(".", "_") or "host"


def read_prompts(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[str]:
    """Non-blank lines of a UTF-8 text file, ``#`` comment lines skipped.

    Raises ``error`` (ValueError by default; callers pass their own subclass) with a one-line
    message when the file is missing, unreadable, not UTF-8, empty, or holds only comments.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"prompt file {path} is a folder; pass a text file with one prompt per line")
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


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, file_mode() if mode is None else mode)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _owner(path: Path) -> tuple[str, int] | None:
    """(host, pid) recorded in a claim file or partial-folder name, or None."""
    try:
        host, pid = path.read_text().strip().rsplit(":", 1) if path.is_file() else path.name.split(".")[-3:-1]
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _stale(path: Path) -> bool:
    owner = _owner(path)
    return owner is not None and owner[0] == _HOST and not _pid_alive(owner[1])


def clean_stale_partials(out: str | os.PathLike) -> None:
    """Remove the partial folders of ``out`` left by killed runs on this machine."""
    out = Path(out)
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.*.partial"):
            if p.is_dir() and _stale(p):
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def claim_output(out: str | os.PathLike):
    """Hold an exclusive claim on ``out`` (lock file ``.<name>.lock`` beside it) while the block runs."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _stale(lock):  # left by a killed run
                lock.unlink(missing_ok=True)
                continue
            owner = _owner(lock)
            raise OutputBusyError(f"{out} is being written by another run (pid {owner[1] if owner else '?'}); wait for "
                                  "it or choose another output") from None
    else:
        raise OutputBusyError(f"cannot claim {out}: {lock} keeps reappearing")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{_HOST}:{os.getpid()}\n")
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)


def check_writable(out: str | os.PathLike) -> Path:
    """Raise PermissionError (one line, naming the folder) unless an output can be created at ``out``."""
    out = Path(out)
    parent = out if out.is_dir() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: {parent} is not writable")
    return out


@contextlib.contextmanager
def merge_into_dir(out: str | os.PathLike):
    """``with merge_into_dir(folder) as tmp:`` write into ``tmp``; on success every file is renamed into
    ``folder`` (same names replaced, one atomic rename each), and files already there are kept."""
    out = Path(out)
    check_writable(out)
    with claim_output(out):
        tmp = out.parent / f".{out.name}.{_HOST}.{os.getpid()}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    target = out / path.relative_to(tmp)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.chmod(path, file_mode())
                    os.replace(path, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """``with staged_output_dir("runs/x") as tmp:`` write into ``tmp``; on success it becomes ``runs/x``.

    The output is claimed for the whole block (:func:`claim_output`); the check for an existing
    output is repeated right before the swap.
    """
    out = check_output_dir(out, overwrite)
    check_writable(out)
    with claim_output(out):
        clean_stale_partials(out)
        tmp = out.parent / f".{out.name}.{_HOST}.{os.getpid()}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            check_output_dir(out, overwrite)  # something appeared meanwhile: keep it
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.chmod(tmp, dir_mode())
        replace_dir(tmp, out)
