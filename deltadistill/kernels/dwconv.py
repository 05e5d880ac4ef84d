"""Depth-wise K×K convolution on channels-last tensors, in Triton: forward, input grad, weight grad.

With x [B, H, W, C], weight w [C, K, K] (K odd), bias [C] and P = K // 2 ('same' zero padding):

    y[b, h, w, c]  = bias[c] + Σ_{i,j<K} w[c, i, j] · x[b, h+i-P, w+j-P, c]       (forward)
    dx[b, h, w, c] = Σ_{i,j<K} w[c, i, j] · dy[b, h-i+P, w-j+P, c]                 (dgrad: the same
                                                                                    conv, kernel flipped)
    dw[c, i, j]    = Σ_{b,h,w} dy[b, h, w, c] · x[b, h+i-P, w+j-P, c]              (wgrad)
    db[c]          = Σ_{b,h,w} dy[b, h, w, c]

Kernels
-------
``_dwconv_kernel`` — one program owns a BLOCK_H×BLOCK_W pixel tile × BLOCK_C channels and loops
over the K² taps, loading the shifted input tile (masked at the image border and at the tails of
H, W, C) and a [BLOCK_C] weight row per tap; accumulation is fp32 whatever the input dtype.
Channels are the contiguous axis, so every load is a coalesced row of channels. Compile-time
switches turn it into the dgrad kernel (``FLIP``) and add the epilogues that
:mod:`deltadistill.kernels.stage` fuses into it:

* ``GATE`` (1 = scaled ``x1·x2·s``, 2 = sigmoid ``x1·σ(x2)``): the program convolves channel c and
  c + C/2 together and writes only the gated value (C/2 channels); ``STORE_PRE`` also keeps the
  pre-gate conv output for the backward pass;
* ``UNPOOL``: the result (the gradient w.r.t. a 2×2-average-pooled input) is divided by the
  window's pixel count and written to the 2×2 window of the full-resolution gradient, i.e. the
  average-pool backward is fused into the dgrad epilogue.

``_dwconv_wgrad_kernel`` — program (i, channel block, split) owns kernel row i: it walks the
pixel tiles of its split, and for each tap j reduces dy·x(shifted) over the tile into a
[K_PAD, BLOCK_C] fp32 register accumulator. Each split writes its own slice of a small fp32
partial buffer [n_split, K, K, C] that is summed afterwards: deterministic, no atomics. The bias
gradient (Σ dy) rides along in the programs with i = 0.

Every launcher has a plain PyTorch ``*_reference`` beside it computing the same function.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from attnprobe.core import backends
from deltadistill import ops

INTERPRET = backends.interpreting()

GATE_MODES = {"none": 0, "scaled": 1, "sigmoid": 2}


def _configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """Autotune list: a few GPU configs, or a single large one under the CPU interpreter
    (the interpreter cannot benchmark, and few big programs keep it fast)."""
    return [interp] if INTERPRET else gpu


def _cfg(num_warps: int, **kw) -> triton.Config:
    return triton.Config(kw, num_warps=num_warps, num_stages=1)


_CONV_CONFIGS = _configs(
    [
        _cfg(4, BLOCK_H=8, BLOCK_W=16, BLOCK_C=32),
        _cfg(4, BLOCK_H=4, BLOCK_W=16, BLOCK_C=64),
        _cfg(8, BLOCK_H=8, BLOCK_W=16, BLOCK_C=64),
        _cfg(8, BLOCK_H=16, BLOCK_W=16, BLOCK_C=32),
    ],
    _cfg(4, BLOCK_H=8, BLOCK_W=8, BLOCK_C=16),
)

_WGRAD_CONFIGS = _configs(
    [
        _cfg(4, BLOCK_H=8, BLOCK_W=16, BLOCK_C=32),
        _cfg(4, BLOCK_H=4, BLOCK_W=32, BLOCK_C=16),
        _cfg(8, BLOCK_H=8, BLOCK_W=32, BLOCK_C=32),
    ],
    _cfg(4, BLOCK_H=8, BLOCK_W=8, BLOCK_C=16),
)


def check_kernel_size(weight: torch.Tensor) -> int:
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2] or weight.shape[1] % 2 == 0:
        raise ValueError(f"depth-wise weight must be [C, K, K] with odd K, got {tuple(weight.shape)}")
    return weight.shape[-1]


def tap_major(weight: torch.Tensor) -> torch.Tensor:
    """[C, K, K] → [K*K, C] (contiguous), so that one tap's weights are one coalesced row."""
    c, k = weight.shape[0], weight.shape[-1]
    return weight.reshape(c, k * k).t().contiguous()


# ----------------------------------------------------------------------------------------------
# Forward / dgrad kernel (+ fused gate and unpool epilogues)
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_CONV_CONFIGS, key=["H", "W", "C", "K", "GATE", "UNPOOL"])
@triton.jit
def _dwconv_kernel(
    x_ptr,  # [B, H, W, C] input, contiguous
    wt_ptr,  # [K*K, C] tap-major weight: w[c, i, j] at (i*K + j)*C + c
    b_ptr,  # [C] bias (read only if HAS_BIAS)
    y_ptr,  # [B, H, W, C], or [B, H, W, C//2] if GATE, or [B, HO, WO, C] if UNPOOL
    pre_ptr,  # [B, H, W, C] pre-gate conv output (written only if STORE_PRE)
    H,
    W,
    C,
    HO,
    WO,
    gate_scale,
    K: tl.constexpr,
    FLIP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATE: tl.constexpr,
    STORE_PRE: tl.constexpr,
    UNPOOL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    PAD: tl.constexpr = K // 2
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    b = pid_p // tiles
    t = pid_p % tiles
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    hh = (t // tiles_w) * BLOCK_H + offs // BLOCK_W  # [P] output rows
    ww = (t % tiles_w) * BLOCK_W + offs % BLOCK_W  # [P] output cols
    if GATE != 0:
        CO = C // 2  # channels written (one gated pair per output channel)
    else:
        CO = C
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BC]
    cm = cc < CO
    b64 = b.to(tl.int64)
    x_img = x_ptr + b64 * H * W * C

    acc1 = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)  # channels cc
    acc2 = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_C), dtype=tl.float32)  # channels cc + C/2 (GATE)
    for i in range(K):
        if FLIP:
            hi = hh + (PAD - i)
        else:
            hi = hh + (i - PAD)
        row_ok = (hi >= 0) & (hi < H)
        row_off = (hi * W + ww) * C  # [P] → x[b, hi, ww, 0]
        for j in range(K):
            if FLIP:
                dj = PAD - j
            else:
                dj = j - PAD
            wj = ww + dj
            ok = row_ok & (wj >= 0) & (wj < W)
            m2 = ok[:, None] & cm[None, :]
            src = x_img + (row_off + dj * C)[:, None] + cc[None, :]  # [P, BC] → x[b, hi, ww + dj, cc]
            w_row = wt_ptr + (i * K + j) * C + cc
            wv = tl.load(w_row, mask=cm, other=0.0).to(tl.float32)
            xv = tl.load(src, mask=m2, other=0.0).to(tl.float32)
            acc1 += xv * wv[None, :]
            if GATE != 0:
                wv2 = tl.load(w_row + CO, mask=cm, other=0.0).to(tl.float32)
                xv2 = tl.load(src + CO, mask=m2, other=0.0).to(tl.float32)
                acc2 += xv2 * wv2[None, :]

    if HAS_BIAS:
        acc1 += tl.load(b_ptr + cc, mask=cm, other=0.0).to(tl.float32)[None, :]
        if GATE != 0:
            acc2 += tl.load(b_ptr + CO + cc, mask=cm, other=0.0).to(tl.float32)[None, :]

    pm = (hh < H) & (ww < W)
    mo = pm[:, None] & cm[None, :]
    pix = hh * W + ww
    if GATE != 0:
        if STORE_PRE:
            pre = pre_ptr + b64 * H * W * C + (pix * C)[:, None] + cc[None, :]
            tl.store(pre, acc1.to(pre_ptr.dtype.element_ty), mask=mo)
            tl.store(pre + CO, acc2.to(pre_ptr.dtype.element_ty), mask=mo)
        if GATE == 1:
            g = acc1 * acc2 * gate_scale
        else:
            g = acc1 * tl.sigmoid(acc2)
        dst = y_ptr + b64 * H * W * CO + (pix * CO)[:, None] + cc[None, :]
        tl.store(dst, g.to(y_ptr.dtype.element_ty), mask=mo)
    elif UNPOOL:
        # acc1 = gradient w.r.t. the pooled pixel (hh, ww); the pooled value averaged the
        # n_h × n_w real pixels of its 2×2 window in the HO × WO input, each gets acc1 / (n_h n_w).
        n_h = tl.maximum(tl.minimum(2 * hh + 2, HO) - 2 * hh, 1)  # (≥ 1 also for masked tail pixels)
        n_w = tl.maximum(tl.minimum(2 * ww + 2, WO) - 2 * ww, 1)
        val = (acc1 / (n_h * n_w).to(tl.float32)[:, None]).to(y_ptr.dtype.element_ty)
        y_img = y_ptr + b64 * HO * WO * C
        for a in tl.static_range(2):
            for e in tl.static_range(2):
                oh = 2 * hh + a
                ow = 2 * ww + e
                ok = pm & (oh < HO) & (ow < WO)
                tl.store(y_img + ((oh * WO + ow) * C)[:, None] + cc[None, :], val, mask=ok[:, None] & cm[None, :])
    else:
        dst = y_ptr + b64 * H * W * C + (pix * C)[:, None] + cc[None, :]
        tl.store(dst, acc1.to(y_ptr.dtype.element_ty), mask=mo)


def dwconv_launch(
    x: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    *,
    flip: bool = False,
    gate: str = "none",
    gate_scale: float = 1.0,
    store_pre: bool = False,
    unpool_to: tuple[int, int] | None = None,
    out_dtype: torch.dtype | None = None,
):
    """Run :func:`_dwconv_kernel`. x [B, H, W, C] contiguous, wt [K*K, C] (see :func:`tap_major`).

    Returns y, or (y, pre) when ``store_pre``. y is [B, H, W, C]; [B, H, W, C//2] with a gate;
    [B, HO, WO, C] with ``unpool_to=(HO, WO)``.
    """
    bsz, h, w, c = x.shape
    gate_id = GATE_MODES[gate]
    if gate_id and c % 2:
        raise ValueError(f"gated conv needs an even channel count, got C={c}")
    co = c // 2 if gate_id else c
    dtype = out_dtype or x.dtype
    if unpool_to is not None:
        ho, wo = unpool_to
        y = torch.empty((bsz, ho, wo, c), device=x.device, dtype=dtype)
    else:
        ho, wo = h, w
        y = torch.empty((bsz, h, w, co), device=x.device, dtype=dtype)
    pre = torch.empty((bsz, h, w, c), device=x.device, dtype=dtype) if store_pre else y
    if x.numel() == 0:
        return (y, pre) if store_pre else y

    def grid(meta):
        tiles = triton.cdiv(h, meta["BLOCK_H"]) * triton.cdiv(w, meta["BLOCK_W"])
        return (bsz * tiles, triton.cdiv(co, meta["BLOCK_C"]))

    _dwconv_kernel[grid](
        x, wt, bias if bias is not None else wt, y, pre, h, w, c, ho, wo, float(gate_scale),
        K=k, FLIP=flip, HAS_BIAS=bias is not None, GATE=gate_id, STORE_PRE=store_pre,
        UNPOOL=unpool_to is not None,
    )
    return (y, pre) if store_pre else y


def dwconv_fwd_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Forward, plain PyTorch: the registered reference of ``ops.dwconv_nhwc``."""
    return ops.dwconv_nhwc_reference(x, weight, bias)


def dwconv_dgrad_reference(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dx = Σ_{i,j} w[c,i,j] dy[h-i+P, w-j+P]: a 'same' conv of dy with the flipped kernel."""
    return ops.dwconv_nhwc_reference(dy, weight.flip(-1, -2), None)


# ----------------------------------------------------------------------------------------------
# Weight-gradient kernel
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_WGRAD_CONFIGS, key=["H", "W", "C", "K"])
@triton.jit
def _dwconv_wgrad_kernel(
    x_ptr,  # [B, H, W, C] forward input
    dy_ptr,  # [B, H, W, C] output gradient
    pw_ptr,  # [n_split, K, K, C] fp32 partial weight gradient
    pb_ptr,  # [n_split, C] fp32 partial bias gradient
    B,
    H,
    W,
    C,
    n_split,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    PAD: tl.constexpr = K // 2
    i = tl.program_id(0)  # kernel row owned by this program
    pid_c = tl.program_id(1)
    s = tl.program_id(2)  # split: tiles s, s + n_split, s + 2 n_split, ...
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    jj = tl.arange(0, K_PAD)
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    acc = tl.zeros((K_PAD, BLOCK_C), dtype=tl.float32)  # dw[c, i, j] for j < K
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile in range(s, B * tiles, n_split):
        b64 = (tile // tiles).to(tl.int64)
        t = tile % tiles
        hh = (t // tiles_w) * BLOCK_H + offs // BLOCK_W
        ww = (t % tiles_w) * BLOCK_W + offs % BLOCK_W
        pm = (hh < H) & (ww < W)
        img = b64 * H * W * C
        dy = tl.load(
            dy_ptr + img + ((hh * W + ww) * C)[:, None] + cc[None, :], mask=pm[:, None] & cm[None, :], other=0.0
        ).to(tl.float32)  # [P, BC]
        if HAS_BIAS:
            acc_b += tl.sum(dy, axis=0)
        hi = hh + (i - PAD)
        row_ok = pm & (hi >= 0) & (hi < H)
        row = hi * W
        for j in range(K):
            wj = ww + (j - PAD)
            ok = row_ok & (wj >= 0) & (wj < W)
            xv = tl.load(
                x_ptr + img + ((row + wj) * C)[:, None] + cc[None, :], mask=ok[:, None] & cm[None, :], other=0.0
            ).to(tl.float32)
            part = tl.sum(dy * xv, axis=0)  # [BC]
            acc += tl.where((jj == j)[:, None], part[None, :], 0.0)
    dst = pw_ptr + ((s * K + i) * K + jj[:, None]) * C + cc[None, :]
    tl.store(dst, acc, mask=(jj < K)[:, None] & cm[None, :])
    if HAS_BIAS:
        if i == 0:
            tl.store(pb_ptr + s * C + cc, acc_b, mask=cm)


def _num_splits(x: torch.Tensor, k: int) -> int:
    """How many pixel splits the wgrad grid uses: enough programs to fill the GPU (≈8 per SM)."""
    if INTERPRET or not x.is_cuda:
        return 1
    bsz, h, w, c = x.shape
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    per_split = k * triton.cdiv(c, 32)
    max_splits = bsz * triton.cdiv(h, 8) * triton.cdiv(w, 16)
    return max(1, min(max_splits, triton.cdiv(8 * sms, per_split), 64))


def dwconv_wgrad(x: torch.Tensor, dy: torch.Tensor, k: int, need_bias: bool = True):
    """Weight (and bias) gradient of the depth-wise conv. x, dy [B, H, W, C] contiguous.

    Returns (dw [C, K, K] fp32, db [C] fp32 or None).
    """
    bsz, h, w, c = x.shape
    n_split = _num_splits(x, k)
    pw = torch.empty((n_split, k, k, c), device=x.device, dtype=torch.float32)
    pb = torch.empty((n_split, c), device=x.device, dtype=torch.float32) if need_bias else pw
    if x.numel() == 0:
        pw.zero_()
        pb.zero_()
    else:
        grid = lambda meta: (k, triton.cdiv(c, meta["BLOCK_C"]), n_split)  # noqa: E731
        _dwconv_wgrad_kernel[grid](
            x, dy, pw, pb, bsz, h, w, c, n_split, K=k, K_PAD=triton.next_power_of_2(k), HAS_BIAS=need_bias
        )
    dw = pw.sum(0).permute(2, 0, 1)  # [C, K, K]
    return dw, (pb.sum(0) if need_bias else None)


def dwconv_wgrad_reference(x: torch.Tensor, dy: torch.Tensor, k: int, need_bias: bool = True):
    """dw[c,i,j] = Σ dy[b,h,w,c] x[b,h+i-P,w+j-P,c] and db[c] = Σ dy, plain PyTorch (NCHW)."""
    c = x.shape[-1]
    xn, dyn = x.permute(0, 3, 1, 2).float(), dy.permute(0, 3, 1, 2).float()
    dw = torch.nn.grad.conv2d_weight(xn, (c, 1, k, k), dyn, padding=k // 2, groups=c).reshape(c, k, k)
    return dw, (dyn.sum((0, 2, 3)) if need_bias else None)


# ----------------------------------------------------------------------------------------------
# Autograd wrapper, registered as the 'triton' backend of ops.dwconv_nhwc
# ----------------------------------------------------------------------------------------------


class DWConvNHWC(torch.autograd.Function):
    """y = dwconv(x, w, b); backward = dgrad kernel (flipped conv) + wgrad kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        k = check_kernel_size(weight)
        x = x.contiguous()
        wt = tap_major(weight)
        y = dwconv_launch(x, wt, bias.contiguous() if bias is not None else None, k)
        ctx.save_for_backward(x, weight, wt)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, wt = ctx.saved_tensors
        k = weight.shape[-1]
        dy = dy.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dwconv_launch(dy, wt, None, k, flip=True, out_dtype=x.dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            dw32, db32 = dwconv_wgrad(x, dy, k, need_bias=ctx.has_bias)
            dw = dw32.to(weight.dtype) if ctx.needs_input_grad[1] else None
            db = db32.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


@backends.register("dwconv", "triton", usable=backends.triton_usable)
def dwconv_nhwc_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depth-wise K×K 'same' conv of x [B, H, W, C] with weight [C, K, K], bias [C] (Triton)."""
    return DWConvNHWC.apply(x, weight, bias)


__all__ = [
    "DWConvNHWC",
    "dwconv_nhwc_triton",
    "dwconv_launch",
    "dwconv_wgrad",
    "dwconv_fwd_reference",
    "dwconv_dgrad_reference",
    "dwconv_wgrad_reference",
    "tap_major",
    "check_kernel_size",
]
