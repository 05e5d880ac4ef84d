"""Adaptive average pooling on channels-last tensors, in Triton (the official ΔConvFusion pooling).

Output cell o of an axis of n_in → n_out averages the input window [s(o), e(o)) with
s(o) = ⌊o·n_in / n_out⌋ and e(o) = ⌈(o + 1)·n_in / n_out⌉ — ``F.adaptive_avg_pool2d``'s rule, so on
an odd side windows overlap (7 → 3 averages rows 0–2, 2–4, 4–6). y[i, j] is the mean over the 2-D
window. Backward without atomics: each input pixel gathers dy[o] / |window(o)| over the few output
cells whose window holds it (SPAN = ⌈n_out / n_in⌉ + 2 candidates per axis, membership tested with
the same formulas). The plain PyTorch reference is :func:`deltadistill.ops.adaptive_pool_reference`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnprobe.core import backends
from deltadistill import ops
from deltadistill.kernels.common import _ELEM_CONFIGS, _elem_grid


@triton.jit
def _window(o, n_in, n_out):
    """[s, e) of output index o along one axis."""
    return (o * n_in) // n_out, ((o + 1) * n_in + n_out - 1) // n_out


@triton.autotune(configs=_ELEM_CONFIGS, key=["C", "MAX_H", "MAX_W"])
@triton.jit
def _adaptive_pool_kernel(
    x_ptr,  # [B, H, W, C]
    y_ptr,  # [B, HO, WO, C]
    n_pix,  # B * HO * WO
    H, W, HO, WO, C,
    MAX_H: tl.constexpr,  # largest window along H
    MAX_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat output pixel
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < n_pix
    cm = cc < C
    b = (p // (HO * WO)).to(tl.int64)
    r = p % (HO * WO)
    hs, he = _window(r // WO, H, HO)
    ws, we = _window(r % WO, W, WO)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in tl.static_range(MAX_H):
        for e in tl.static_range(MAX_W):
            ok = pm & (hs + a < he) & (ws + e < we)
            src = x_ptr + (((b * H + hs + a) * W + ws + e) * C)[:, None] + cc[None, :]
            acc += tl.load(src, mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)
    acc = acc / ((he - hs) * (we - ws)).to(tl.float32)[:, None]
    tl.store(y_ptr + (p.to(tl.int64) * C)[:, None] + cc[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=pm[:, None] & cm[None, :])


@triton.autotune(configs=_ELEM_CONFIGS, key=["C", "SPAN_H", "SPAN_W"])
@triton.jit
def _adaptive_pool_bwd_kernel(
    dy_ptr,  # [B, HO, WO, C]
    dx_ptr,  # [B, H, W, C]
    n_pix,  # B * H * W
    H, W, HO, WO, C,
    SPAN_H: tl.constexpr,
    SPAN_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat input pixel
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < n_pix
    cm = cc < C
    b = (p // (H * W)).to(tl.int64)
    r = p % (H * W)
    rh = r // W
    rw = r % W
    oh0 = (rh * HO) // H - 1  # first candidate output row (windows hold rh only near rh·HO/H)
    ow0 = (rw * WO) // W - 1
    g = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in tl.static_range(SPAN_H):
        oh = oh0 + a
        hs, he = _window(oh, H, HO)
        in_h = (oh >= 0) & (oh < HO) & (hs <= rh) & (rh < he)
        for e in tl.static_range(SPAN_W):
            ow = ow0 + e
            ws, we = _window(ow, W, WO)
            ok = pm & in_h & (ow >= 0) & (ow < WO) & (ws <= rw) & (rw < we)
            cnt = tl.where(ok, (he - hs) * (we - ws), 1).to(tl.float32)
            src = dy_ptr + (((b * HO + oh) * WO + ow) * C)[:, None] + cc[None, :]
            g += tl.load(src, mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32) / cnt[:, None]
    tl.store(dx_ptr + (p.to(tl.int64) * C)[:, None] + cc[None, :], g.to(dx_ptr.dtype.element_ty),
             mask=pm[:, None] & cm[None, :])


def _max_window(n_in: int, n_out: int) -> int:
    return max((((o + 1) * n_in + n_out - 1) // n_out) - (o * n_in) // n_out for o in range(n_out))


def adaptive_pool_launch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    bsz, h, w, c = x.shape
    ho, wo = (int(s) for s in size)
    y = torch.empty((bsz, ho, wo, c), device=x.device, dtype=x.dtype)
    if y.numel():
        n = bsz * ho * wo
        _adaptive_pool_kernel[_elem_grid(n, c)](x, y, n, h, w, ho, wo, c, MAX_H=_max_window(h, ho), MAX_W=_max_window(w, wo))
    return y


def adaptive_pool_bwd_launch(dy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    bsz, ho, wo, c = dy.shape
    h, w = (int(s) for s in size)
    dx = torch.empty((bsz, h, w, c), device=dy.device, dtype=dy.dtype)
    if dx.numel():
        n = bsz * h * w
        _adaptive_pool_bwd_kernel[_elem_grid(n, c)](dy, dx, n, h, w, ho, wo, c, SPAN_H=math.ceil(ho / h) + 2,
                                                    SPAN_W=math.ceil(wo / w) + 2)
    return dx


class AdaptivePoolNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size):
        x = x.contiguous()
        ctx.in_size = tuple(x.shape[1:3])
        return adaptive_pool_launch(x, size)

    @staticmethod
    def backward(ctx, dy):
        return adaptive_pool_bwd_launch(dy.contiguous(), ctx.in_size), None


@backends.register("adaptive_pool", "triton", usable=backends.triton_usable)
def adaptive_pool_triton(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling of x [B, H, W, C] to ``size`` (Triton)."""
    return AdaptivePoolNHWC.apply(x, tuple(int(s) for s in size))


adaptive_pool_reference = ops.adaptive_pool_reference

__all__ = ["AdaptivePoolNHWC", "adaptive_pool_triton", "adaptive_pool_launch", "adaptive_pool_bwd_launch",
           "adaptive_pool_reference"]
