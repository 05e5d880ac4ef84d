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

__all__ = ["UsageError", "make_app", "command", "fail", "quiet_libraries", "calm_threads", "check_device", "debug_enabled",
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


def calm_threads() -> None:
    """Thread settings that do not collapse when other jobs share the CPU (set before torch is imported).

    OpenMP's busy-waiting made analysis 12× slower on a loaded machine; passive waiting costs
    nothing when the machine is idle. A value the user set is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
