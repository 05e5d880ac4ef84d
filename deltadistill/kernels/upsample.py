"""Bilinear upsampling (align_corners=False, any output size) on channels-last tensors, in Triton.

Exactly torch's rule per axis: src = max((o + ½)·(n_in/n_out) − ½, 0), i0 = ⌊src⌋,
i1 = min(i0 + 1, n_in − 1), λ1 = src − i0, λ0 = 1 − λ1; y[o_h, o_w] = Σ λ_h λ_w x[i_h, i_w] over
the 2×2 source pixels. Backward without atomics: each *input* pixel gathers
Σ λ_h(o_h) λ_w(o_w) dy[o_h, o_w] over the few output pixels whose i0 or i1 hits it (a window of
SPAN = ⌈2·n_out/n_in⌉ + 3 candidates per axis, membership tested with the forward formula).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnprobe.core import backends
from deltadistill import ops
from deltadistill.kernels.common import _ELEM_CONFIGS, _elem_grid, _src_index

@triton.autotune(configs=_ELEM_CONFIGS, key=["CH"])
@triton.jit
def _upsample_kernel(
    x_ptr,  # [B, HI, WI, CH]
    y_ptr,  # [B, HO, WO, CH]
    n_pix,  # B * HO * WO
    HI,
    WI,
    HO,
    WO,
    CH,
    scale_h,  # HI / HO
    scale_w,  # WI / WO
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat output pixel
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < n_pix
    m2 = pm[:, None] & (cc < CH)[None, :]
    b = (p // (HO * WO)).to(tl.int64)
    r = p % (HO * WO)
    h0, h1, lh0, lh1 = _src_index(r // WO, scale_h, HI)
    w0, w1, lw0, lw1 = _src_index(r % WO, scale_w, WI)
    img = b * HI * WI  # [P] first pixel of the image in x
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in tl.static_range(2):
        if a == 0:
            hs = h0
            lh = lh0
        else:
            hs = h1
            lh = lh1
        for e in tl.static_range(2):
            if e == 0:
                ws = w0
                lw = lw0
            else:
                ws = w1
                lw = lw1
            src = x_ptr + ((img + hs * WI + ws) * CH)[:, None] + cc[None, :]
            v = tl.load(src, mask=m2, other=0.0).to(tl.float32)
            acc += (lh * lw)[:, None] * v
    dst = (p.to(tl.int64) * CH)[:, None] + cc[None, :]
    tl.store(y_ptr + dst, acc.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _axis_weight(o, r, scale, n_in, n_out):
    """Weight with which output index o reads input index r along one axis (0 if it does not)."""
    i0, i1, l0, l1 = _src_index(o, scale, n_in)
    wgt = tl.where(i0 == r, l0, 0.0) + tl.where(i1 == r, l1, 0.0)
    return tl.where((o >= 0) & (o < n_out), wgt, 0.0)


@triton.autotune(configs=_ELEM_CONFIGS, key=["CH", "SPAN_H", "SPAN_W"])
@triton.jit
def _upsample_bwd_kernel(
    dy_ptr,  # [B, HO, WO, CH]
    dx_ptr,  # [B, HI, WI, CH]
    n_pix,  # B * HI * WI
    HI,
    WI,
    HO,
    WO,
    CH,
    scale_h,  # HI / HO
    scale_w,
    inv_h,  # HO / HI
    inv_w,
    SPAN_H: tl.constexpr,
    SPAN_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat input (low-res) pixel
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < n_pix
    cm = cc < CH
    b = (p // (HI * WI)).to(tl.int64)
    r = p % (HI * WI)
    rh = r // WI
    rw = r % WI
    # first output index that can read row rh: src(o) >= rh - 1  ⇔  o >= (rh - ½)·HO/HI - ½ (-1 for rounding)
    oh_lo = tl.maximum(((rh.to(tl.float32) - 0.5) * inv_h - 0.5).to(tl.int32) - 1, 0)
    ow_lo = tl.maximum(((rw.to(tl.float32) - 0.5) * inv_w - 0.5).to(tl.int32) - 1, 0)
    img = b * HO * WO  # [P] first pixel of the image in dy
    g = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in range(SPAN_H):
        oh = oh_lo + a
        wh = _axis_weight(oh, rh, scale_h, HI, HO)  # [P]
        for e in range(SPAN_W):
            ow = ow_lo + e
            wgt = wh * _axis_weight(ow, rw, scale_w, WI, WO)
            ok = pm & (wgt != 0.0)
            v = tl.load(dy_ptr + ((img + oh * WO + ow) * CH)[:, None] + cc[None, :], mask=ok[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            g += wgt[:, None] * v
    m2 = pm[:, None] & cm[None, :]
    off = (p.to(tl.int64) * CH)[:, None] + cc[None, :]
    tl.store(dx_ptr + off, g.to(dx_ptr.dtype.element_ty), mask=m2)


def _span(n_in: int, n_out: int) -> int:
    """Candidate output indices per input index in the gather backward (see module docstring)."""
    return math.ceil(2 * n_out / n_in) + 3


def upsample_launch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """y = bilinear resize of x to ``size``. x [B, HI, WI, C] contiguous → [B, HO, WO, C]."""
    bsz, hi, wi, ch = x.shape
    ho, wo = (int(s) for s in size)
    y = torch.empty((bsz, ho, wo, ch), device=x.device, dtype=x.dtype)
    if y.numel():
        n_pix = bsz * ho * wo
        _upsample_kernel[_elem_grid(n_pix, ch)](x, y, n_pix, hi, wi, ho, wo, ch, hi / ho, wi / wo)
    return y


def upsample_bwd_launch(dy: torch.Tensor, in_size: tuple[int, int]) -> torch.Tensor:
    """Gradient w.r.t. the upsample input, [B, HI, WI, C]."""
    bsz, ho, wo, ch = dy.shape
    hi, wi = in_size
    dx = torch.empty((bsz, hi, wi, ch), device=dy.device, dtype=dy.dtype)
    if dx.numel():
        n_pix = bsz * hi * wi
        _upsample_bwd_kernel[_elem_grid(n_pix, ch)](
            dy, dx, n_pix, hi, wi, ho, wo, ch, hi / ho, wi / wo, ho / hi, wo / wi, SPAN_H=_span(hi, ho), SPAN_W=_span(wi, wo),
        )
    return dx


def upsample_reference(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return ops.upsample_bilinear_nhwc_reference(x, size)


def upsample_bwd_reference(dy: torch.Tensor, in_size: tuple[int, int]) -> torch.Tensor:
    """Adjoint of the bilinear resize, via autograd of the reference."""
    bsz, _, _, c = dy.shape
    x = torch.zeros((bsz, *in_size, c), dtype=dy.dtype, device=dy.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(ops.upsample_bilinear_nhwc_reference(x, dy.shape[1:3]), x, dy)
    return g


class UpsampleNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size):
        x = x.contiguous()
        ctx.in_size = tuple(x.shape[1:3])
        return upsample_launch(x, size)

    @staticmethod
    def backward(ctx, dy):
        return upsample_bwd_launch(dy.contiguous(), ctx.in_size), None


@backends.register("upsample", "triton", usable=backends.triton_usable)
def upsample_bilinear_nhwc_triton(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of x [B, H, W, C] to ``size``, align_corners=False (Triton)."""
    return UpsampleNHWC.apply(x, tuple(int(s) for s in size))

