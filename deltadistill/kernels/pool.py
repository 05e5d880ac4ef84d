"""2×2 average pooling (stride 2, ceil mode) on channels-last tensors, in Triton.

y[i, j] = Σ_{h∈{2i,2i+1}<H, w∈{2j,2j+1}<W} x[h, w] / (n_h·n_w): a partial window at an odd border
averages only its real pixels. Backward: dx[h, w] = dy[h//2, w//2] / (n_h·n_w).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from attnprobe.core import backends
from deltadistill import ops
from deltadistill.kernels.common import _ELEM_CONFIGS, _elem_grid

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


@backends.register("avgpool2", "triton", usable=backends.triton_usable)
def avgpool2_nhwc_triton(x: torch.Tensor) -> torch.Tensor:
    """2×2 average pooling, stride 2, ceil mode, partial windows over real pixels (Triton)."""
    return AvgPool2NHWC.apply(x)

