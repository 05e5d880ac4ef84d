"""Pooling, bilinear upsampling and gating for the ΔConvBlock pyramid, channels-last, in Triton.

All tensors are [B, H, W, C], channels contiguous. Each op has an autograd Function with Triton
forward and backward kernels, registered as the ``triton`` backend of :mod:`deltadistill.ops`.

* **avgpool2** — 2×2 window, stride 2, ceil mode; a partial window at an odd border averages only
  its real pixels:  y[i, j] = Σ_{h∈{2i,2i+1}<H, w∈{2j,2j+1}<W} x[h, w] / (n_h·n_w).
  Backward: dx[h, w] = dy[h//2, w//2] / (n_h·n_w).
* **upsample** (bilinear, align_corners=False, any output size), exactly torch's rule per axis:
  src = max((o + ½)·(n_in/n_out) − ½, 0), i0 = ⌊src⌋, i1 = min(i0 + 1, n_in − 1), λ1 = src − i0,
  λ0 = 1 − λ1;  y[o_h, o_w] = Σ λ_h λ_w x[i_h, i_w] over the 2×2 source pixels.
  Backward without atomics: each *input* pixel gathers Σ λ_h(o_h) λ_w(o_w) dy[o_h, o_w] over
  the few output pixels whose i0 or i1 hits it (a window of SPAN = ⌈2·n_out/n_in⌉ + 3
  candidates per axis, membership tested with the same formula as the forward pass).
* **gate** — split channels into halves x1 = x[..., :C/2], x2 = x[..., C/2:]:
  scaled g = x1·x2·s  (d/dx1 = x2·s, d/dx2 = x1·s);
  sigmoid g = x1·σ(x2)  (d/dx1 = σ(x2), d/dx2 = x1·σ(x2)(1 − σ(x2))).

Fused ops (what is fused, exactly):

* **half_stage** = avgpool2 → depth-wise conv → gate. Forward: one pooling kernel writes the
  quarter-size pooled map p; then ONE conv kernel computes both conv halves of a channel pair
  (c, c + C/2), adds the bias and applies the gate in its epilogue, so the C-channel conv output
  never goes to memory unless autograd needs it (then it is stored once, for the gate backward).
  Backward: gate-backward kernel (du) → ONE dgrad kernel whose epilogue does the pooling
  backward (writes dp / count into each 2×2 window of dx, so dp is never materialised) → the
  wgrad kernel on (p, du).
* **gate_upsample_add** = gate → bilinear upsample → + out, in ONE kernel per direction. Forward:
  each output pixel loads its 2×2 low-resolution (x1, x2) pairs, gates them in registers,
  interpolates and adds ``out``. Backward: each low-resolution pixel gathers the upsample
  gradient and applies the gate backward in the same kernel (d out is dy itself).

Every launcher has a plain PyTorch ``*_reference`` beside it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from deltadistill import ops
from deltadistill.kernels.dwconv import (
    GATE_MODES,
    _cfg,
    _configs,
    check_kernel_size,
    dwconv_launch,
    dwconv_wgrad,
    tap_major,
)

_ELEM_CONFIGS = _configs(
    [
        _cfg(4, BLOCK_P=32, BLOCK_C=64),
        _cfg(4, BLOCK_P=64, BLOCK_C=32),
        _cfg(8, BLOCK_P=64, BLOCK_C=64),
    ],
    _cfg(4, BLOCK_P=64, BLOCK_C=32),
)


def _gate_id(mode: str) -> int:
    if mode not in ("scaled", "sigmoid"):
        raise ValueError(f"unknown gate {mode!r}; choose 'scaled' or 'sigmoid'")
    return GATE_MODES[mode]


def _elem_grid(n_pix: int, channels: int):
    return lambda meta: (triton.cdiv(n_pix, meta["BLOCK_P"]), triton.cdiv(channels, meta["BLOCK_C"]))


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gate_fwd(a, b, GATE: tl.constexpr, scale):
    """g = a·b·scale (GATE=1) or a·σ(b) (GATE=2); fp32 in, fp32 out."""
    if GATE == 1:
        g = a * b * scale
    else:
        g = a * tl.sigmoid(b)
    return g


@triton.jit
def _gate_bwd(g, a, b, GATE: tl.constexpr, scale):
    """(dL/da, dL/db) of the gate given dL/dgate = g; fp32."""
    if GATE == 1:
        da = g * b * scale
        db = g * a * scale
    else:
        sb = tl.sigmoid(b)
        da = g * sb
        db = g * a * sb * (1.0 - sb)
    return da, db


@triton.jit
def _src_index(o, scale, n_in):
    """torch's bilinear source index (align_corners=False) for output index o: (i0, i1, λ0, λ1)."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), n_in - 1)  # src >= 0, so the cast floors
    i1 = tl.minimum(i0 + 1, n_in - 1)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


# ----------------------------------------------------------------------------------------------
# avgpool2
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_ELEM_CONFIGS, key=["C"])
@triton.jit
def _avgpool2_kernel(
    x_ptr,  # [B, H, W, C]
    y_ptr,  # [B, HO, WO, C], HO = ceil(H/2), WO = ceil(W/2)
    n_pix,  # B * HO * WO
    H,
    W,
    HO,
    WO,
    C,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat output pixel
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < n_pix
    cm = cc < C
    b = (p // (HO * WO)).to(tl.int64)
    r = p % (HO * WO)
    h = 2 * (r // WO)
    w = 2 * (r % WO)
    n_h = tl.minimum(h + 2, H) - h
    n_w = tl.minimum(w + 2, W) - w
    base = x_ptr + ((b * H + h) * W + w) * C  # [P] → x[b, h, w, 0]
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for a in tl.static_range(2):
        for e in tl.static_range(2):
            ok = pm & (a < n_h) & (e < n_w)
            ptr = base + (a * W + e) * C
            acc += tl.load(ptr[:, None] + cc[None, :], mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)
    acc = acc / (n_h * n_w).to(tl.float32)[:, None]
    tl.store(y_ptr + (p.to(tl.int64) * C)[:, None] + cc[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=pm[:, None] & cm[None, :])


@triton.autotune(configs=_ELEM_CONFIGS, key=["C"])
@triton.jit
def _avgpool2_bwd_kernel(
    dy_ptr,  # [B, HO, WO, C]
    dx_ptr,  # [B, H, W, C]
    n_pix,  # B * H * W
    H,
    W,
    HO,
    WO,
    C,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat input pixel
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pm = p < n_pix
    cm = cc < C
    m2 = pm[:, None] & cm[None, :]
    b = (p // (H * W)).to(tl.int64)
    r = p % (H * W)
    i = (r // W) // 2
    j = (r % W) // 2
    n = (tl.minimum(2 * i + 2, H) - 2 * i) * (tl.minimum(2 * j + 2, W) - 2 * j)
    src = dy_ptr + (((b * HO + i) * WO + j) * C)[:, None] + cc[None, :]
    g = tl.load(src, mask=m2, other=0.0).to(tl.float32) / n.to(tl.float32)[:, None]
    tl.store(dx_ptr + (p.to(tl.int64) * C)[:, None] + cc[None, :], g.to(dx_ptr.dtype.element_ty), mask=m2)


def avgpool2_launch(x: torch.Tensor) -> torch.Tensor:
    bsz, h, w, c = x.shape
    ho, wo = ops.pooled_size(h, w)
    y = torch.empty((bsz, ho, wo, c), device=x.device, dtype=x.dtype)
    if y.numel():
        _avgpool2_kernel[_elem_grid(bsz * ho * wo, c)](x, y, bsz * ho * wo, h, w, ho, wo, c)
    return y


def avgpool2_bwd_launch(dy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    bsz, ho, wo, c = dy.shape
    h, w = size
    dx = torch.empty((bsz, h, w, c), device=dy.device, dtype=dy.dtype)
    if dx.numel():
        _avgpool2_bwd_kernel[_elem_grid(bsz * h * w, c)](dy, dx, bsz * h * w, h, w, ho, wo, c)
    return dx


def avgpool2_reference(x: torch.Tensor) -> torch.Tensor:
    return ops.avgpool2_nhwc_reference(x)


def avgpool2_bwd_reference(dy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """dx[h, w] = dy[h//2, w//2] / (pixels in that window)."""
    h, w = size
    ih = torch.arange(h, device=dy.device) // 2  # [H] pooled row of each input row
    iw = torch.arange(w, device=dy.device) // 2
    nh = (torch.clamp(2 * ih + 2, max=h) - 2 * ih).to(dy.dtype)  # real rows in that window
    nw = (torch.clamp(2 * iw + 2, max=w) - 2 * iw).to(dy.dtype)
    return dy[:, ih][:, :, iw] / (nh[:, None, None] * nw[None, :, None])


class AvgPool2NHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.size = x.shape[1:3]
        return avgpool2_launch(x)

    @staticmethod
    def backward(ctx, dy):
        return avgpool2_bwd_launch(dy.contiguous(), ctx.size)


@ops.register("avgpool2", "triton")
def avgpool2_nhwc_triton(x: torch.Tensor) -> torch.Tensor:
    """2×2 average pooling, stride 2, ceil mode, partial windows over real pixels (Triton)."""
    return AvgPool2NHWC.apply(x)


# ----------------------------------------------------------------------------------------------
# gate
# ----------------------------------------------------------------------------------------------


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


@ops.register("gate", "triton")
def gate_triton(x: torch.Tensor, mode: str = "scaled", scale: float = 1.0) -> torch.Tensor:
    """x1·x2·scale or x1·σ(x2) over the channel halves of x (Triton)."""
    _gate_id(mode)
    return GateNHWC.apply(x, mode, scale)


# ----------------------------------------------------------------------------------------------
# bilinear upsample (+ optional fused gate before it and residual add after it)
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_ELEM_CONFIGS, key=["CH", "GATE", "HAS_OUT"])
@triton.jit
def _upsample_kernel(
    x_ptr,  # [B, HI, WI, CX], CX = 2*CH if GATE else CH
    out_ptr,  # [B, HO, WO, CH] residual to add (read only if HAS_OUT)
    y_ptr,  # [B, HO, WO, CH]
    n_pix,  # B * HO * WO
    HI,
    WI,
    HO,
    WO,
    CH,
    scale_h,  # HI / HO
    scale_w,  # WI / WO
    gate_scale,
    GATE: tl.constexpr,
    HAS_OUT: tl.constexpr,
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
    if GATE != 0:
        CX = 2 * CH
    else:
        CX = CH
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
            src = x_ptr + ((img + hs * WI + ws) * CX)[:, None] + cc[None, :]
            v = tl.load(src, mask=m2, other=0.0).to(tl.float32)
            if GATE != 0:
                v2 = tl.load(src + CH, mask=m2, other=0.0).to(tl.float32)
                v = _gate_fwd(v, v2, GATE, gate_scale)
            acc += (lh * lw)[:, None] * v
    dst = (p.to(tl.int64) * CH)[:, None] + cc[None, :]
    if HAS_OUT:
        acc += tl.load(out_ptr + dst, mask=m2, other=0.0).to(tl.float32)
    tl.store(y_ptr + dst, acc.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _axis_weight(o, r, scale, n_in, n_out):
    """Weight with which output index o reads input index r along one axis (0 if it does not)."""
    i0, i1, l0, l1 = _src_index(o, scale, n_in)
    wgt = tl.where(i0 == r, l0, 0.0) + tl.where(i1 == r, l1, 0.0)
    return tl.where((o >= 0) & (o < n_out), wgt, 0.0)


@triton.autotune(configs=_ELEM_CONFIGS, key=["CH", "GATE", "SPAN_H", "SPAN_W"])
@triton.jit
def _upsample_bwd_kernel(
    dy_ptr,  # [B, HO, WO, CH]
    x_ptr,  # [B, HI, WI, 2*CH] forward input (read only if GATE)
    dx_ptr,  # [B, HI, WI, CX]
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
    gate_scale,
    GATE: tl.constexpr,
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
    if GATE != 0:
        off = (p.to(tl.int64) * 2 * CH)[:, None] + cc[None, :]
        x1 = tl.load(x_ptr + off, mask=m2, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + off + CH, mask=m2, other=0.0).to(tl.float32)
        d1, d2 = _gate_bwd(g, x1, x2, GATE, gate_scale)
        tl.store(dx_ptr + off, d1.to(dx_ptr.dtype.element_ty), mask=m2)
        tl.store(dx_ptr + off + CH, d2.to(dx_ptr.dtype.element_ty), mask=m2)
    else:
        off = (p.to(tl.int64) * CH)[:, None] + cc[None, :]
        tl.store(dx_ptr + off, g.to(dx_ptr.dtype.element_ty), mask=m2)


def _span(n_in: int, n_out: int) -> int:
    """Candidate output indices per input index in the gather backward (see module docstring)."""
    return math.ceil(2 * n_out / n_in) + 3


def upsample_launch(
    x: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None, gate: str = "none", gate_scale: float = 1.0
) -> torch.Tensor:
    """y = upsample(gate(x) or x, size) (+ out). x [B, HI, WI, CX] contiguous → [B, HO, WO, CH]."""
    bsz, hi, wi, cx = x.shape
    ho, wo = (int(s) for s in size)
    gate_id = GATE_MODES[gate]
    if gate_id and cx % 2:
        raise ValueError(f"gate needs an even channel count, got C={cx}")
    ch = cx // 2 if gate_id else cx
    y = torch.empty((bsz, ho, wo, ch), device=x.device, dtype=x.dtype)
    if out is not None and tuple(out.shape) != tuple(y.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(y.shape)}")
    if y.numel():
        n_pix = bsz * ho * wo
        _upsample_kernel[_elem_grid(n_pix, ch)](
            x, out if out is not None else y, y, n_pix, hi, wi, ho, wo, ch, hi / ho, wi / wo, float(gate_scale),
            GATE=gate_id, HAS_OUT=out is not None,
        )
    return y


def upsample_bwd_launch(
    dy: torch.Tensor, in_size: tuple[int, int], x: torch.Tensor | None = None, gate: str = "none",
    gate_scale: float = 1.0,
) -> torch.Tensor:
    """Gradient w.r.t. the upsample input (or, with a gate, w.r.t. the gate input x)."""
    bsz, ho, wo, ch = dy.shape
    hi, wi = in_size
    gate_id = GATE_MODES[gate]
    cx = 2 * ch if gate_id else ch
    dx = torch.empty((bsz, hi, wi, cx), device=dy.device, dtype=x.dtype if x is not None else dy.dtype)
    if dx.numel():
        n_pix = bsz * hi * wi
        _upsample_bwd_kernel[_elem_grid(n_pix, ch)](
            dy, x if x is not None else dy, dx, n_pix, hi, wi, ho, wo, ch, hi / ho, wi / wo, ho / hi, wo / wi,
            float(gate_scale), GATE=gate_id, SPAN_H=_span(hi, ho), SPAN_W=_span(wi, wo),
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


@ops.register("upsample", "triton")
def upsample_bilinear_nhwc_triton(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of x [B, H, W, C] to ``size``, align_corners=False (Triton)."""
    return UpsampleNHWC.apply(x, tuple(int(s) for s in size))


class GateUpsampleAddNHWC(torch.autograd.Function):
    """y = upsample(gate(x), size) + out, one kernel forward and one kernel backward."""

    @staticmethod
    def forward(ctx, x, size, out, mode, scale):
        x = x.contiguous()
        out_c = out.contiguous() if out is not None else None
        ctx.save_for_backward(x)
        ctx.mode, ctx.scale, ctx.has_out = mode, scale, out is not None
        return upsample_launch(x, size, out_c, gate=mode, gate_scale=scale)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = upsample_bwd_launch(dy, tuple(x.shape[1:3]), x, gate=ctx.mode, gate_scale=ctx.scale)
        dout = dy if ctx.has_out and ctx.needs_input_grad[2] else None
        return dx, None, dout, None, None


@ops.register("gate_upsample_add", "triton")
def gate_upsample_add_triton(
    x: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None, mode: str = "scaled", scale: float = 1.0
) -> torch.Tensor:
    """gate(x) bilinearly upsampled to ``size`` plus ``out`` (fused, Triton)."""
    _gate_id(mode)
    return GateUpsampleAddNHWC.apply(x, tuple(int(s) for s in size), out, mode, scale)


def gate_upsample_add_reference(x, size, out=None, mode="scaled", scale=1.0):
    return ops.gate_upsample_add_reference(x, size, out, mode, scale)


# ----------------------------------------------------------------------------------------------
# half_stage: avgpool2 → depth-wise conv → gate
# ----------------------------------------------------------------------------------------------


class HalfStageNHWC(torch.autograd.Function):
    """pool kernel → conv kernel with gate epilogue; backward: gate-bwd → dgrad+unpool → wgrad."""

    @staticmethod
    def forward(ctx, x, weight, bias, mode, scale):
        k = check_kernel_size(weight)
        x = x.contiguous()
        wt = tap_major(weight)
        p = avgpool2_launch(x)  # [B, ⌈H/2⌉, ⌈W/2⌉, C]
        b = bias.contiguous() if bias is not None else None
        if any(ctx.needs_input_grad[:3]):  # keep the pre-gate conv output for the gate backward
            y, pre = dwconv_launch(p, wt, b, k, gate=mode, gate_scale=scale, store_pre=True)
            ctx.save_for_backward(p, pre, weight, wt)
        else:
            y = dwconv_launch(p, wt, b, k, gate=mode, gate_scale=scale)
        ctx.mode, ctx.scale, ctx.size, ctx.has_bias = mode, scale, tuple(x.shape[1:3]), bias is not None
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        p, pre, weight, wt = ctx.saved_tensors
        k = weight.shape[-1]
        du = gate_bwd_launch(dy.contiguous(), pre, ctx.mode, ctx.scale)  # [B, h, w, C] d(conv output)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dwconv_launch(du, wt, None, k, flip=True, unpool_to=ctx.size, out_dtype=ctx.x_dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            dw32, db32 = dwconv_wgrad(p, du, k, need_bias=ctx.has_bias)
            dw = dw32.to(weight.dtype) if ctx.needs_input_grad[1] else None
            db = db32.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


@ops.register("half_stage", "triton")
def half_stage_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str = "scaled", scale: float = 1.0
) -> torch.Tensor:
    """avgpool2 → depth-wise conv → gate on x [B, H, W, C] → [B, ⌈H/2⌉, ⌈W/2⌉, C/2] (Triton)."""
    _gate_id(mode)
    return HalfStageNHWC.apply(x, weight, bias, mode, scale)


def half_stage_reference(x, weight, bias, mode="scaled", scale=1.0):
    return ops.half_stage_reference(x, weight, bias, mode, scale)


__all__ = [
    "AvgPool2NHWC",
    "GateNHWC",
    "UpsampleNHWC",
    "GateUpsampleAddNHWC",
    "HalfStageNHWC",
    "avgpool2_nhwc_triton",
    "gate_triton",
    "upsample_bilinear_nhwc_triton",
    "gate_upsample_add_triton",
    "half_stage_triton",
    "avgpool2_launch",
    "avgpool2_bwd_launch",
    "gate_launch",
    "gate_bwd_launch",
    "upsample_launch",
    "upsample_bwd_launch",
    "avgpool2_reference",
    "avgpool2_bwd_reference",
    "gate_reference",
    "gate_bwd_reference",
    "upsample_reference",
    "upsample_bwd_reference",
    "gate_upsample_add_reference",
    "half_stage_reference",
]
