"""What both command lines share: one error path, quiet libraries, ``--debug`` and ``--version``.

:func:`command` wraps every typer command:

* user errors (:class:`~attnprobe.core.errors.UserError` and its subclasses, ``ValueError``,
  missing or existing files) print ``error: <one line>`` on stderr and exit with code 2;
* Ctrl-C exits with code 130;
* anything else is unexpected: ``error: unexpected <Type>: <one line>`` plus a hint to rerun with
  ``--debug``, exit code 1; with ``--debug`` the traceback is printed too.

:func:`make_app` builds a typer app with the ``--debug`` and ``--version`` options.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
import warnings

import typer

from attnprobe.core.errors import UserError

__all__ = ["UsageError", "make_app", "command", "fail", "quiet_libraries", "calm_threads", "omp_wait_setting", "check_device", "debug_enabled",
           "USER_ERRORS"]

USER_ERRORS = (UserError, ValueError, OSError)  # OSError: missing/read-only files, a full disk ...
_STATE = {"debug": os.environ.get("ATTNPROBE_DEBUG") == "1"}


class UsageError(UserError):
    """A bad combination of command-line options."""


def debug_enabled() -> bool:
    return _STATE["debug"]


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"  # e.g. a read-only folder, a full disk
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(message, code: int = 2):
    """Print ``error: <message>`` (first line) on stderr and exit with ``code``."""
    text = _first_line(message) if isinstance(message, BaseException) else (str(message).splitlines() or ["error"])[0]
    typer.echo(f"error: {text}", err=True)
    raise typer.Exit(code)


def command(fn):
    """Decorator for typer commands: the one error path (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort) as exc:
            raise exc
        except USER_ERRORS as exc:
            if debug_enabled():
                traceback.print_exc()
            fail(exc, 2)
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if debug_enabled():
                traceback.print_exc()
                fail(f"unexpected {type(exc).__name__}: {_first_line(exc)}", 1)
            fail(f"unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)", 1)

    return wrapper


SPIN_WHEN_IDLE = 10_000  # GNU OpenMP spin iterations before a waiting thread sleeps (its own scale: ~0.1 ms)
IDLE_BELOW = 0.25  # CPUs' worth of other work under which the machine counts as idle


def _cpu_times(stat: str = "/proc/stat") -> tuple[int, int]:
    """(total, idle) jiffies of all CPUs from the first line of ``/proc/stat`` (idle counts iowait; steal and
    guest time count as busy: on a virtual machine the host is using the core, and guest time is inside user)."""
    with open(stat) as f:
        head, *fields = f.readline().split()
    if head != "cpu" or len(fields) < 5:
        raise ValueError(f"{stat}: not a Linux CPU time line")
    v = [int(x) for x in fields[:8]]
    return sum(v), v[3] + v[4]


def busy_cpus(before: tuple[int, int], after: tuple[int, int], cpus: int) -> float | None:
    """CPUs' worth of work between two :func:`_cpu_times` samples (None if no time passed)."""
    total, idle = after[0] - before[0], after[1] - before[1]
    return cpus * (1 - idle / total) if total > 0 else None


def cpu_busy(interval: float = 0.15, stat: str = "/proc/stat") -> float | None:
    """CPUs' worth of work the whole machine did over ``interval`` seconds (None where ``/proc/stat`` is not).

    Called while this process sleeps, so it measures the other processes.
    """
    import time

    try:
        before = _cpu_times(stat)
        time.sleep(interval)
        return busy_cpus(before, _cpu_times(stat), os.cpu_count() or 1)
    except (OSError, ValueError):
        return None


def calm_threads(probe=cpu_busy) -> str:
    """OpenMP waiting that neither collapses on a busy CPU nor wastes an idle one (set before torch is imported).

    Busy-waiting OpenMP threads made analysis 12× slower when other jobs shared the cores (measured: 7× with
    one busy-loop process beside it on 2 cores), so waiting is passive (``OMP_WAIT_POLICY=PASSIVE``). But on
    an idle CPU passive waiting is not free: every parallel region wakes sleeping threads, and the demo's
    analysis took 20 s against 17 s with a short spin (3 prompts, 2 cores), a small matmul 90 µs against 8 µs.
    So when the machine is idle at start (other work under :data:`IDLE_BELOW` CPUs), GNU OpenMP (PyTorch's on
    Linux) spins :data:`SPIN_WHEN_IDLE` iterations before sleeping; if a job starts later this costs up to
    ~1.5× (one busy-loop process beside the demo's analysis), not the collapse of the default spin.
    Ranks of a distributed launch (``LOCAL_WORLD_SIZE`` or ``WORLD_SIZE`` > 1) share the cores with each other,
    so they wait passively. A value the user set for ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept; values this
    function set in a parent process (marked by ``ATTNPROBE_OMP_AUTO``) are decided again. Returns what was
    chosen: ``"user"``, ``"spin"`` or ``"passive"``.
    """
    if os.environ.pop("ATTNPROBE_OMP_AUTO", None) == "1":  # inherited from a parent command line: decide here
        for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            os.environ.pop(v, None)
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return "user"
    os.environ["ATTNPROBE_OMP_AUTO"] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # every OpenMP runtime; GNU's spin count below overrides it
    busy = probe() if _launch_ranks() == 1 else None
    if busy is not None and busy < IDLE_BELOW:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_WHEN_IDLE)
        return "spin"
    return "passive"


def _launch_ranks() -> int:
    """Processes of a distributed launch (torchrun and accelerate set these variables), else 1."""
    sizes = (os.environ.get(v, "").strip() for v in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"))
    return max((int(x) for x in sizes if x.isdigit()), default=1)


def omp_wait_setting() -> str:
    """How OpenMP threads wait in this process, in words (for the run metadata of timings)."""
    spin, policy = os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY")
    if spin is not None:
        return f"GOMP_SPINCOUNT={spin}"
    return f"OMP_WAIT_POLICY={policy}" if policy is not None else "the OpenMP runtime's default"


def check_device(device: str) -> str:
    """``auto`` → cuda if present else cpu; otherwise a valid, available torch device string."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} requested but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def quiet_libraries() -> None:
    """Offline by default, and diffusers/transformers chatter (warnings, loading bars) silenced."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - older library versions
        pass


def make_app(name: str, help: str, version: str) -> typer.Typer:
    """A typer app with ``--debug`` (tracebacks for unexpected errors) and ``--version``."""
    app = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

    def show_version(value: bool):
        if value:
            typer.echo(f"{name} {version}")
            raise typer.Exit()

    @app.callback()
    def _root(
        debug: bool = typer.Option(False, "--debug", help="Print the traceback of unexpected errors."),
        version_: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="Print the version and exit."),
    ):
        _STATE["debug"] = debug or os.environ.get("ATTNPROBE_DEBUG") == "1"
        quiet_libraries()

    _root.__doc__ = help
    return app


def escape_help_markup(app: typer.Typer) -> None:
    """Escape square brackets in every command's option help and docstring, once all commands are registered.

    typer renders help through rich markup, which would swallow text such as ``[toolkit 16]`` (the preset values
    the help names) as an unknown style tag."""
    import inspect

    from rich.markup import escape
    from typer.models import ParameterInfo

    for info in app.registered_commands:
        for param in inspect.signature(info.callback).parameters.values():
            if isinstance(param.default, ParameterInfo) and param.default.help and not getattr(param.default, "_escaped", False):
                param.default.help = escape(param.default.help)
                param.default._escaped = True
        if info.help is None and info.callback.__doc__:
            info.help = escape(inspect.getdoc(info.callback))


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
