"""Channels-last primitives of the ΔConvBlock, with one dispatch point.

Every op here takes and returns channels-last tensors ``[B, H, W, C]``. Each op has a
``reference`` implementation in plain PyTorch (runs anywhere; on CPU it transposes to NCHW,
where depth-wise convolution is ~3-4x faster) and, where a GPU and Triton are present, a
``triton`` implementation registered by :mod:`deltadistill.kernels`.

Backend choice happens in exactly one place, :func:`resolve_backend`:

* an explicit ``backend=`` argument wins (``"reference"`` or ``"triton"``);
* otherwise the environment variable ``DELTADISTILL_BACKEND`` (``reference``/``triton``/``auto``);
* ``auto`` picks ``triton`` when the tensor lives on a CUDA device and Triton kernels are
  registered for the op, else ``reference``.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "register",
    "resolve_backend",
    "triton_available",
    "dwconv_nhwc",
    "avgpool2_nhwc",
    "upsample_bilinear_nhwc",
    "gate",
    "half_stage",
    "gate_upsample_add",
    "pooled_size",
]

# op name -> backend name -> callable
BACKENDS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``."""

    def deco(fn: Callable) -> Callable:
        BACKENDS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (or the interpreter is on)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _load_triton_kernels() -> None:
    """Import the Triton kernels so that they register themselves (no-op if unavailable)."""
    try:
        import deltadistill.kernels  # noqa: F401
    except Exception:  # pragma: no cover - a broken Triton install must not break the CPU path
        pass


def resolve_backend(op: str, x: torch.Tensor, backend: str | None = None) -> str:
    """Return the backend that will run ``op`` on tensor ``x`` (see module docstring)."""
    choice = backend or os.environ.get("DELTADISTILL_BACKEND", "auto")
    if choice not in ("auto", "reference", "triton"):
        raise ValueError(f"unknown backend {choice!r}; choose 'auto', 'reference' or 'triton'")
    if choice == "reference":
        return "reference"
    if triton_available():
        _load_triton_kernels()
    has_triton = "triton" in BACKENDS.get(op, {}) and triton_available()
    if choice == "triton":
        if not has_triton:
            raise RuntimeError(
                f"backend 'triton' requested for {op!r} but Triton kernels are unavailable "
                "(needs `pip install triton` and a CUDA device, or TRITON_INTERPRET=1 for tests)"
            )
        return "triton"
    return "triton" if has_triton and x.is_cuda else "reference"


def _dispatch(op: str, x: torch.Tensor, backend: str | None, *args, **kwargs):
    return BACKENDS[op][resolve_backend(op, x, backend)](x, *args, **kwargs)


def pooled_size(h: int, w: int) -> tuple[int, int]:
    """Grid after 2x2 average pooling with ceil mode (odd sizes keep their last row/column)."""
    return math.ceil(h / 2), math.ceil(w / 2)


# ----------------------------------------------------------------------------------------------
# Reference implementations (plain PyTorch). Shapes: x [B, H, W, C].
# ----------------------------------------------------------------------------------------------


@register("dwconv", "reference")
def dwconv_nhwc_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depth-wise K×K convolution, 'same' zero padding. weight [C, K, K] (K odd), bias [C]."""
    c, k = weight.shape[0], weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight.reshape(c, 1, k, k), bias, padding=k // 2, groups=c)
    return y.permute(0, 2, 3, 1)  # [B, H, W, C] (a view; callers may .contiguous())


@register("avgpool2", "reference")
def avgpool2_nhwc_reference(x: torch.Tensor) -> torch.Tensor:
    """2×2 average pooling, stride 2, ceil mode; partial windows average only real pixels."""
    y = F.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2, ceil_mode=True, count_include_pad=False)
    return y.permute(0, 2, 3, 1)


@register("upsample", "reference")
def upsample_bilinear_nhwc_reference(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size`` = (H, W), align_corners=False."""
    y = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1)


@register("gate", "reference")
def gate_reference(x: torch.Tensor, mode: str = "scaled", scale: float = 1.0) -> torch.Tensor:
    """Split channels into halves x1, x2 → ``x1*x2*scale`` ('scaled') or ``x1*sigmoid(x2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    if mode == "scaled":
        return x1 * x2 * scale
    if mode == "sigmoid":
        return x1 * torch.sigmoid(x2)
    raise ValueError(f"unknown gate {mode!r}; choose 'scaled' or 'sigmoid'")


@register("half_stage", "reference")
def half_stage_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str = "scaled", scale: float = 1.0
) -> torch.Tensor:
    """The ½-scale pyramid stage before upsampling: avgpool2 → depth-wise conv → gate."""
    return gate_reference(dwconv_nhwc_reference(avgpool2_nhwc_reference(x), weight, bias), mode, scale)


@register("gate_upsample_add", "reference")
def gate_upsample_add_reference(
    x: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None, mode: str = "scaled", scale: float = 1.0
) -> torch.Tensor:
    """gate(x) upsampled bilinearly to ``size``, plus ``out`` if given (fused on GPU)."""
    y = upsample_bilinear_nhwc_reference(gate_reference(x, mode, scale), size)
    return y if out is None else out + y


# ----------------------------------------------------------------------------------------------
# Public, dispatched entry points.
# ----------------------------------------------------------------------------------------------


def dwconv_nhwc(x, weight, bias=None, backend: str | None = None):
    return _dispatch("dwconv", x, backend, weight, bias)


def avgpool2_nhwc(x, backend: str | None = None):
    return _dispatch("avgpool2", x, backend)


def upsample_bilinear_nhwc(x, size, backend: str | None = None):
    return _dispatch("upsample", x, backend, size)


def gate(x, mode: str = "scaled", scale: float = 1.0, backend: str | None = None):
    return _dispatch("gate", x, backend, mode, scale)


def half_stage(x, weight, bias=None, mode: str = "scaled", scale: float = 1.0, backend: str | None = None):
    return _dispatch("half_stage", x, backend, weight, bias, mode, scale)


def gate_upsample_add(x, size, out=None, mode: str = "scaled", scale: float = 1.0, backend: str | None = None):
    return _dispatch("gate_upsample_add", x, backend, size, out, mode, scale)
