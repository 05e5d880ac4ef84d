"""The gate of the ΔConvBlock on channels-last tensors, in Triton.

Split channels into halves x1 = x[..., :C/2], x2 = x[..., C/2:]:
scaled g = x1·x2·s (d/dx1 = x2·s, d/dx2 = x1·s); sigmoid g = x1·σ(x2)
(d/dx1 = σ(x2), d/dx2 = x1·σ(x2)(1 − σ(x2))).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from attnprobe.core import backends
from deltadistill import ops
from deltadistill.kernels.common import _ELEM_CONFIGS, _elem_grid, _gate_bwd, _gate_fwd, _gate_id

@triton.autotune(configs=_ELEM_CONFIGS, key=["CH", "GATE"])
@triton.jit
def _gate_kernel(
    x_ptr,  # [n_pix, 2*CH]
    y_ptr,  # [n_pix, CH]
    n_pix,
    CH,
    scale,
    GATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m2 = (p < n_pix)[:, None] & (cc < CH)[None, :]
    src = x_ptr + (p * 2 * CH)[:, None] + cc[None, :]
    a = tl.load(src, mask=m2, other=0.0).to(tl.float32)
    b = tl.load(src + CH, mask=m2, other=0.0).to(tl.float32)
    g = _gate_fwd(a, b, GATE, scale)
    tl.store(y_ptr + (p * CH)[:, None] + cc[None, :], g.to(y_ptr.dtype.element_ty), mask=m2)


@triton.autotune(configs=_ELEM_CONFIGS, key=["CH", "GATE"])
@triton.jit
def _gate_bwd_kernel(
    dy_ptr,  # [n_pix, CH]
    x_ptr,  # [n_pix, 2*CH] forward input
    dx_ptr,  # [n_pix, 2*CH]
    n_pix,
    CH,
    scale,
    GATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m2 = (p < n_pix)[:, None] & (cc < CH)[None, :]
    g = tl.load(dy_ptr + (p * CH)[:, None] + cc[None, :], mask=m2, other=0.0).to(tl.float32)
    off = (p * 2 * CH)[:, None] + cc[None, :]
    a = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + off + CH, mask=m2, other=0.0).to(tl.float32)
    da, db = _gate_bwd(g, a, b, GATE, scale)
    tl.store(dx_ptr + off, da.to(dx_ptr.dtype.element_ty), mask=m2)
    tl.store(dx_ptr + off + CH, db.to(dx_ptr.dtype.element_ty), mask=m2)


def gate_launch(x: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    *lead, c = x.shape
    if c % 2:
        raise ValueError(f"gate needs an even channel count, got C={c}")
    y = torch.empty((*lead, c // 2), device=x.device, dtype=x.dtype)
    n_pix = y.numel() // max(c // 2, 1)
    if y.numel():
        _gate_kernel[_elem_grid(n_pix, c // 2)](x, y, n_pix, c // 2, float(scale), GATE=_gate_id(mode))
    return y


def gate_bwd_launch(dy: torch.Tensor, x: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    dx = torch.empty_like(x)
    ch = x.shape[-1] // 2
    n_pix = dy.numel() // max(ch, 1)
    if dx.numel():
        _gate_bwd_kernel[_elem_grid(n_pix, ch)](dy, x, dx, n_pix, ch, float(scale), GATE=_gate_id(mode))
    return dx


def gate_reference(x: torch.Tensor, mode: str = "scaled", scale: float = 1.0) -> torch.Tensor:
    return ops.gate_reference(x, mode, scale)


def gate_bwd_reference(dy: torch.Tensor, x: torch.Tensor, mode: str = "scaled", scale: float = 1.0) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    if mode == "scaled":
        return torch.cat([dy * x2 * scale, dy * x1 * scale], -1)
    s = torch.sigmoid(x2)
    return torch.cat([dy * s, dy * x1 * s * (1 - s)], -1)


class GateNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode, scale):
        x = x.contiguous()
        ctx.save_for_backward(x)
        ctx.mode, ctx.scale = mode, scale
        return gate_launch(x, mode, scale)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return gate_bwd_launch(dy.contiguous(), x, ctx.mode, ctx.scale), None, None


@backends.register("gate", "triton", usable=backends.triton_usable)
def gate_triton(x: torch.Tensor, mode: str = "scaled", scale: float = 1.0) -> torch.Tensor:
    """x1·x2·scale or x1·σ(x2) over the channel halves of x (Triton)."""
    _gate_id(mode)
    return GateNHWC.apply(x, mode, scale)

