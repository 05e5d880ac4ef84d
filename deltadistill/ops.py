"""Channels-last primitives of the ΔConvBlock, dispatched through the one backend registry.

Every op takes and returns channels-last tensors ``[B, H, W, C]``. Each has a ``reference``
implementation here in plain PyTorch (runs anywhere: it hands PyTorch a permuted NCHW *view*,
channels-last in memory, with no copy; on this CPU, torch 2.13, oneDNN's channels-last depth-wise
convolution is 7-15× faster than a contiguous NCHW input at C' = 576, K = 13, and 1.4× slower at
C' = 160, K = 9, so channels-last is kept throughout) and, where a GPU and Triton are present, a ``triton``
implementation in :mod:`deltadistill.kernels`; ``dwconv`` and ``stage`` also have a ``cpu`` one, a
compiled C kernel for the CPU, with a backward (:mod:`deltadistill.cpu_kernel`). Which one runs is decided by
:mod:`attnprobe.core.backends` (``backend=`` argument, else ``ATTNPROBE_BACKEND``, else auto).

Ops: ``dwconv`` (depth-wise K×K, 'same' zero padding), ``avgpool2`` (2×2, stride 2, ceil mode),
``adaptive_pool`` (adaptive average pooling to a size: the official code's ⌊n/2⌋ with overlapping
windows on odd sides), ``upsample`` (bilinear, align_corners=False), ``gate`` (x1·x2·s or
x1·σ(x2)) and the fused ``stage`` = [pool →] dwconv → gate, one pyramid stage before its upsampling.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attnprobe.core import backends
from attnprobe.core.sites import halve_grid
from deltadistill import cpu_kernel

__all__ = [
    "OPS",
    "dwconv_nhwc",
    "avgpool2_nhwc",
    "adaptive_pool_nhwc",
    "adaptive_size",
    "upsample_bilinear_nhwc",
    "upsample_add",
    "folds_biases",
    "gate",
    "stage",
    "pooled_size",
    "resolve_backend",
]

OPS = ("dwconv", "avgpool2", "adaptive_pool", "upsample", "gate", "stage")
POOLS = ("ceil", "adaptive")
backends.provide("deltadistill.kernels", *OPS)


def pooled_size(h: int, w: int) -> tuple[int, int]:
    """Grid after 2x2 average pooling with ceil mode (odd sizes keep their last row/column)."""
    return halve_grid((h, w))


def adaptive_size(h: int, w: int, level: int = 1) -> tuple[int, int]:
    """Grid of the official adaptive pooling to scale 1/2^level: (⌊H·s⌋, ⌊W·s⌋), at least 1×1."""
    s = 0.5**level
    return max(1, int(h * s)), max(1, int(w * s))


def resolve_backend(op: str, x: torch.Tensor, backend: str | None = None) -> str:
    """The backend that will run ``op`` on ``x`` (see :func:`attnprobe.core.backends.resolve`)."""
    return backends.resolve(op, x, backend)


# ----------------------------------------------------------------------------------------------
# Reference implementations (plain PyTorch). Shapes: x [B, H, W, C].
# ----------------------------------------------------------------------------------------------


@backends.register("dwconv", "reference")
def dwconv_nhwc_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depth-wise K×K convolution, 'same' zero padding. weight [C, K, K] (K odd), bias [C]."""
    c, k = weight.shape[0], weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight.reshape(c, 1, k, k), bias, padding=k // 2, groups=c)
    return y.permute(0, 2, 3, 1)  # [B, H, W, C] (a view; callers may .contiguous())


@backends.register("avgpool2", "reference")
def avgpool2_nhwc_reference(x: torch.Tensor) -> torch.Tensor:
    """2×2 average pooling, stride 2, ceil mode; partial windows average only real pixels."""
    y = F.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2, ceil_mode=True, count_include_pad=False)
    return y.permute(0, 2, 3, 1)


@backends.register("adaptive_pool", "reference")
def adaptive_pool_reference(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling to ``size`` = (h, w): window [⌊i·H/h⌋, ⌈(i+1)·H/h⌉) per axis."""
    return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), tuple(int(v) for v in size)).permute(0, 2, 3, 1)


@backends.register("upsample", "reference")
def upsample_bilinear_nhwc_reference(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to ``size`` = (H, W), align_corners=False."""
    y = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1)


@backends.register("gate", "reference")
def gate_reference(x: torch.Tensor, mode: str = "scaled", scale: float = 1.0) -> torch.Tensor:
    """Split channels into halves x1, x2 → ``x1*x2*scale`` ('scaled') or ``x1*sigmoid(x2)``."""
    x1, x2 = x.chunk(2, dim=-1)
    if mode == "scaled":
        return x1 * x2 * scale
    if mode == "sigmoid":
        return x1 * torch.sigmoid(x2)
    raise ValueError(f"unknown gate {mode!r}; choose 'scaled' or 'sigmoid'")


@backends.register("stage", "reference")
def stage_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str = "scaled",
                    scale: float = 1.0, pool: str | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """One pyramid stage before upsampling: [pool →] depth-wise conv → gate. [B, H, W, C] → [B, h, w, C/2].

    ``pool``: None (full resolution), ``"ceil"`` (2×2 average pooling, ceil mode) or
    ``"adaptive"`` (adaptive average pooling to ``size``).
    """
    x = _pool(x, pool, size)
    return gate_reference(dwconv_nhwc_reference(x, weight, bias), mode, scale)


def _pool(x, pool, size):
    if pool is None:
        return x
    if pool == "ceil":
        return avgpool2_nhwc_reference(x)
    if pool == "adaptive":
        if size is None:
            raise ValueError("adaptive pooling needs the output size")
        return adaptive_pool_reference(x, size)
    raise ValueError(f"unknown pool {pool!r}; choose one of {POOLS}")


# ----------------------------------------------------------------------------------------------
# Public, dispatched entry points.
# ----------------------------------------------------------------------------------------------


def dwconv_nhwc(x, weight, bias=None, backend: str | None = None):
    return backends.call("dwconv", x, weight, bias, backend=backend)


def avgpool2_nhwc(x, backend: str | None = None):
    return backends.call("avgpool2", x, backend=backend)


def adaptive_pool_nhwc(x, size, backend: str | None = None):
    return backends.call("adaptive_pool", x, tuple(int(v) for v in size), backend=backend)


def upsample_bilinear_nhwc(x, size, backend: str | None = None):
    return backends.call("upsample", x, size, backend=backend)


def folds_biases(x, backend: str | None = None) -> bool:
    """Whether the CPU kernel runs this block (fp32 CPU, no gradient recorded, no CPU autocast, kernel built): there
    the projections' biases ride in its passes (``stage(in_bias=)``, ``upsample_add(bias=)``) rather than in the
    matmuls, where PyTorch adds a bias as a pass of its own over the output (0.19 ms of a 0.82 ms projection at SD1.5's
    level 0). Under autocast the projections return bf16 and the kernel would not run: nothing is folded there."""
    if torch.is_autocast_enabled("cpu"):
        return False
    try:
        return backends.resolve("upsample_add", x, backend) == "cpu"
    except RuntimeError:  # e.g. backend="triton": the fused op exists only on the CPU
        return False


def upsample_add(out, y, backend: str | None = None, bias=None):
    """``out += up_{H×W}(y) (+ bias[b])`` in place (bias per image, [B, C], or None), returns ``out``: one fused
    pass with the CPU kernel, else the dispatched ``upsample`` (Triton on a GPU) and adds."""
    fused = folds_biases(y, backend) and out.is_contiguous() and out.dtype == y.dtype and out.device == y.device
    if fused:
        return backends.call("upsample_add", y, out, bias, backend="cpu")
    out.add_(upsample_bilinear_nhwc(y, tuple(out.shape[1:3]), backend=backend))
    return out if bias is None else out.add_(bias[:, None, None, :])


@backends.register("upsample_add", "reference")
def upsample_add_reference(y: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out += up_{H×W}(y) (+ bias[b])`` in place (the reference of the CPU kernel's fused pass)."""
    out.add_(upsample_bilinear_nhwc_reference(y, tuple(out.shape[1:3])))
    return out if bias is None else out.add_(bias[:, None, None, :])


def gate(x, mode: str = "scaled", scale: float = 1.0, backend: str | None = None):
    return backends.call("gate", x, mode, scale, backend=backend)


def stage(x, weight, bias=None, mode: str = "scaled", scale: float = 1.0, pool: str | None = None, size=None,
          backend: str | None = None, in_bias=None):
    """One pyramid stage of ``x + in_bias`` (``in_bias`` [C] or None: the preceding projection's bias, which the CPU
    kernel adds while it packs its input; elsewhere an add first). Pooling commutes with the add: it averages."""
    if pool not in (None, *POOLS):
        raise ValueError(f"unknown pool {pool!r}; choose one of {POOLS}")
    if in_bias is None:
        return backends.call("stage", x, weight, bias, mode, scale, pool, size, backend=backend)
    if backends.resolve("stage", x, backend) == "cpu":
        return stage_cpu(x, weight, bias, mode, scale, pool, size, in_bias=in_bias)
    return backends.call("stage", x + in_bias, weight, bias, mode, scale, pool, size, backend=backend)


# ----------------------------------------------------------------------------------------------
# The ``cpu`` backend: the compiled kernel of deltadistill.cpu_kernel (built on first use) where it is
# faster for the shape at hand, timed once per shape; else the reference above. With a gradient recorded
# (training) the stage is pool → convolution → gate with only the convolution compiled: its backward
# computes the weight gradient in the kernel (oneDNN's takes 5-11× longer at K ≥ 9 on the demo's shapes).
# Training does not time: which path runs there is a fixed rule, so that a run repeats bit for bit (a timed
# choice can differ between processes, and the two paths round differently).
# ----------------------------------------------------------------------------------------------

TRAIN_MIN_K = 5  # training: the kernel from K = 5 up; oneDNN at K = 3, where its weight gradient is faster


def _pick(key, kernel, reference, timed: bool, k: int):
    if timed:
        return kernel if cpu_kernel.kernel_is_faster(key, kernel, reference) else reference
    return kernel if k >= TRAIN_MIN_K or not cpu_kernel.autotuning() else reference


def _dwconv_forward(x, weight, bias=None, timed: bool = True):
    def kernel():
        return cpu_kernel.dwconv_nhwc_cpu(x, weight, bias)

    def reference():
        return dwconv_nhwc_reference(x, weight, bias)

    k = weight.shape[-1]
    return _pick(("dwconv", *x.shape, k), kernel, reference, timed, k)()


def _dwconv_weight_grad(x, grad, weight, timed: bool = True):
    c, k = weight.shape[0], weight.shape[-1]

    def kernel():
        return cpu_kernel.dwconv_weight_grad_cpu(x, grad, k)

    def reference():  # PyTorch's (oneDNN's) weight gradient alone
        return torch.ops.aten.convolution_backward(
            grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight.reshape(c, 1, k, k), None, (1, 1), (k // 2, k // 2),
            (1, 1), False, (0, 0), c, [False, True, False])[1].reshape(c, k, k)

    return _pick(("dwconv_wgrad", *x.shape, k), kernel, reference, timed, k)()


class _DepthwiseConvCPU(torch.autograd.Function):
    """``dwconv`` with a backward: the input gradient is the convolution of the output gradient with the flipped
    kernel (odd K, 'same' padding), the weight gradient a correlation of input and output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dwconv_forward(x, weight, bias, timed=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        gx = _dwconv_forward(grad, weight.flip(1, 2), timed=False) if ctx.needs_input_grad[0] else None
        gw = _dwconv_weight_grad(x, grad, weight, timed=False) if ctx.needs_input_grad[1] else None
        gb = grad.sum(dim=(0, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


@backends.register("dwconv", "cpu", cpu_kernel.trainable)
def dwconv_nhwc_cpu(x, weight, bias=None):
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _DepthwiseConvCPU.apply(x, weight, bias)
    return _dwconv_forward(x, weight, bias)


@backends.register("stage", "cpu", cpu_kernel.trainable)
def stage_cpu(x, weight, bias, mode="scaled", scale=1.0, pool=None, size=None, in_bias=None):
    x = _pool(x, pool, size)
    if torch.is_grad_enabled():  # training: the gate by autograd, the convolution with its compiled backward
        return gate_reference(dwconv_nhwc_cpu(x if in_bias is None else x + in_bias, weight, bias), mode, scale)

    def kernel():
        return cpu_kernel.stage_cpu(x, weight, bias, mode, scale, in_bias=in_bias)

    def reference():
        return stage_reference(x if in_bias is None else x + in_bias, weight, bias, mode, scale)

    key = ("stage", *x.shape, weight.shape[-1], mode, in_bias is not None)  # with in_bias the reference adds a pass
    return (kernel if cpu_kernel.kernel_is_faster(key, kernel, reference) else reference)()


backends.register("upsample_add", "cpu", cpu_kernel.usable)(cpu_kernel.upsample_add_cpu)
