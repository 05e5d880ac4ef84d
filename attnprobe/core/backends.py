"""The one backend registry for every kernel of both packages.

An *op* (``"dwconv"``, ``"stage"``, ``"ring_mass_attention"``, ...) has implementations keyed by
backend name: always a ``"reference"`` (plain PyTorch, runs anywhere), a ``"triton"`` one where a
fused GPU kernel exists, and a ``"cpu"`` one where a compiled CPU kernel exists (the ΔConvBlock's
depth-wise stage, :mod:`deltadistill.cpu_kernel`). Each implementation may carry a capability
check ``usable(tensor) -> bool``. The choice is made here and only here (:func:`resolve`):

1. an explicit ``backend=`` argument wins (``"reference"``, ``"triton"``, ``"cpu"`` or ``"auto"``);
2. otherwise the environment variable ``ATTNPROBE_BACKEND`` (same values; default ``auto``);
3. ``auto`` takes the fastest registered implementation whose capability check passes for the
   tensor (``triton``: Triton installed and a CUDA tensor; ``cpu``: a built kernel and an fp32 CPU
   tensor, and for the inference-only ``upsample_add`` no gradient recorded), else ``reference``.

Asking for ``triton`` or ``cpu`` where it cannot run raises with the reason; ``cpu`` asked of an op
that has no compiled kernel runs the reference. Kernel modules register
themselves when imported; a package declares them lazily with :func:`provide` so that Triton is
imported only when a GPU path is possible, and a broken Triton install never breaks the CPU path.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["ENV", "CHOICES", "register", "provide", "resolve", "call", "implementations", "preferring", "triton_importable",
           "triton_usable", "interpreting"]

ENV = "ATTNPROBE_BACKEND"
CHOICES = ("auto", "reference", "triton", "cpu")
_PREFERENCE = ("triton", "cpu", "reference")  # what auto tries, in order


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    usable: Callable[[torch.Tensor], bool] | None


_OPS: dict[str, dict[str, _Impl]] = {}
_PROVIDERS: dict[str, list[str]] = {}  # op → modules that register more implementations when imported
_LOADED: set[str] = set()


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read before kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def triton_usable(x: torch.Tensor) -> bool:
    """The default capability check of Triton kernels: Triton imports and ``x`` is on CUDA (or interpreting)."""
    return (x.is_cuda or interpreting()) and triton_importable()


def register(op: str, backend: str, usable: Callable[[torch.Tensor], bool] | None = None):
    """Decorator: ``fn`` is the ``backend`` implementation of ``op`` (``usable`` its capability check)."""

    def deco(fn: Callable) -> Callable:
        _OPS.setdefault(op, {})[backend] = _Impl(fn, usable)
        return fn

    return deco


def provide(module: str, *ops: str) -> None:
    """Declare that importing ``module`` registers (GPU) implementations of ``ops``."""
    for op in ops:
        _PROVIDERS.setdefault(op, [])
        if module not in _PROVIDERS[op]:
            _PROVIDERS[op].append(module)


def _load_providers(op: str) -> None:
    for module in _PROVIDERS.get(op, []):
        if module in _LOADED:
            continue
        _LOADED.add(module)
        if not triton_importable():
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # pragma: no cover - a broken GPU stack must not break the CPU path
            warnings.warn(f"GPU kernels in {module} could not be loaded ({exc!r}); using the PyTorch reference")


def implementations(op: str) -> dict[str, Callable]:
    """``{backend: fn}`` registered for ``op`` (providers loaded)."""
    _load_providers(op)
    if op not in _OPS:
        raise KeyError(f"no op {op!r}; registered: {', '.join(sorted(_OPS))}")
    return {name: impl.fn for name, impl in _OPS[op].items()}


_OVERRIDE: contextvars.ContextVar[tuple[str, bool] | None] = contextvars.ContextVar("attnprobe_backend", default=None)


@contextlib.contextmanager
def preferring(choice: str, *, over_explicit: bool = False):
    """Within the block (this thread or task only), calls without an explicit ``backend=`` resolve as if
    ``ATTNPROBE_BACKEND=choice``; with ``over_explicit=True`` calls with one do too (FLOP counting, which must
    see every operator as a PyTorch op, uses ``preferring("reference", over_explicit=True)``)."""
    if choice not in CHOICES:
        raise ValueError(f"unknown backend {choice!r}; choose {', '.join(CHOICES)}")
    token = _OVERRIDE.set((choice, over_explicit))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _choice(backend: str | None) -> str:
    override = _OVERRIDE.get()
    if override is not None and (backend is None or override[1]):
        choice = override[0]
    elif backend is not None:
        choice = backend
    else:
        choice = os.environ.get(ENV)
        if choice is None and os.environ.get("DELTADISTILL_BACKEND"):
            choice = os.environ["DELTADISTILL_BACKEND"]
            warnings.warn(f"DELTADISTILL_BACKEND is now {ENV}; please rename the variable", stacklevel=4)
        choice = choice or "auto"
    if choice not in CHOICES:
        raise ValueError(f"unknown backend {choice!r}; choose {', '.join(CHOICES)}")
    return choice


def resolve(op: str, x: torch.Tensor, backend: str | None = None) -> str:
    """The backend that will run ``op`` on tensor ``x`` (see the module docstring)."""
    choice = _choice(backend)
    if choice == "reference":
        if op not in _OPS or "reference" not in _OPS[op]:
            raise KeyError(f"op {op!r} has no reference implementation")
        return "reference"
    _load_providers(op)
    impls = _OPS.get(op, {})
    if choice != "auto":
        impl = impls.get(choice)
        if impl is None and choice == "cpu":
            return "reference"  # the compiled CPU kernels cover the depth-wise stage; the other ops are PyTorch's
        if impl is None:
            need = ("" if choice != "triton" else
                    " (needs `pip install triton` and a CUDA device, or TRITON_INTERPRET=1 for tests)")
            raise RuntimeError(f"backend {choice!r} requested for {op!r} but it has no such implementation{need}")
        if impl.usable is not None and not impl.usable(x):
            need = ("a C compiler and an fp32 CPU tensor, and for an inference-only op no gradient recorded "
                    "(torch.no_grad())" if choice == "cpu"
                    else "CUDA tensors, or TRITON_INTERPRET=1 for tests")
            raise RuntimeError(f"backend {choice!r} cannot run {op!r} on a {x.device.type} {x.dtype} tensor here "
                               f"(it needs {need})")
        return choice
    for name in _PREFERENCE:
        impl = impls.get(name)
        if impl is not None and (name != "triton" or x.is_cuda) and (impl.usable is None or impl.usable(x)):
            return name
    return "reference"


def call(op: str, x: torch.Tensor, *args, backend: str | None = None, **kwargs):
    """Run ``op`` on ``x`` with the resolved backend."""
    return _OPS[op][resolve(op, x, backend)].fn(x, *args, **kwargs)
