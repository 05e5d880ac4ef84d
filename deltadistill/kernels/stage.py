"""One fused ΔConvBlock pyramid stage, in Triton: [pool →] depth-wise conv → gate.

Forward: (with ``pool``: ``"ceil"`` 2×2 or ``"adaptive"``) one pooling kernel writes the pooled map p; then ONE conv kernel
computes both conv halves of a channel pair (c, c + C/2), adds the bias and applies the gate in
its epilogue, so the C-channel conv output never goes to memory unless autograd needs it (then it
is stored once, for the gate backward). Backward: gate-backward kernel (du) → ONE dgrad kernel,
whose epilogue (with ``pool="ceil"``) does the pooling backward (writes dp / count into each 2×2
window of dx, so dp is never materialised; adaptive pooling runs its own backward kernel on dp) →
the wgrad kernel on (p, du). The plain PyTorch reference is
:func:`deltadistill.ops.stage_reference`.
"""
from __future__ import annotations

import torch

from attnprobe.core import backends
from deltadistill import ops
from deltadistill.kernels.adaptive_pool import adaptive_pool_bwd_launch, adaptive_pool_launch
from deltadistill.kernels.common import _gate_id
from deltadistill.kernels.dwconv import check_kernel_size, dwconv_launch, dwconv_wgrad, tap_major
from deltadistill.kernels.gate import gate_bwd_launch
from deltadistill.kernels.pool import avgpool2_launch


class StageNHWC(torch.autograd.Function):
    """[pool kernel →] conv kernel with gate epilogue; backward: gate-bwd → dgrad(+unpool) → wgrad."""

    @staticmethod
    def forward(ctx, x, weight, bias, mode, scale, pool, size):
        k = check_kernel_size(weight)
        x = x.contiguous()
        wt = tap_major(weight)
        if pool == "ceil":
            p = avgpool2_launch(x)  # [B, ⌈H/2⌉, ⌈W/2⌉, C]
        elif pool == "adaptive":
            p = adaptive_pool_launch(x, size)  # [B, h, w, C]
        else:
            p = x
        b = bias.contiguous() if bias is not None else None
        if any(ctx.needs_input_grad[:3]):  # keep the pre-gate conv output for the gate backward
            y, pre = dwconv_launch(p, wt, b, k, gate=mode, gate_scale=scale, store_pre=True)
            ctx.save_for_backward(p, pre, weight, wt)
        else:
            y = dwconv_launch(p, wt, b, k, gate=mode, gate_scale=scale)
        ctx.mode, ctx.scale, ctx.size, ctx.has_bias, ctx.pool = mode, scale, tuple(x.shape[1:3]), bias is not None, pool
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        p, pre, weight, wt = ctx.saved_tensors
        k = weight.shape[-1]
        du = gate_bwd_launch(dy.contiguous(), pre, ctx.mode, ctx.scale)  # [B, h, w, C] d(conv output)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dwconv_launch(du, wt, None, k, flip=True, unpool_to=ctx.size if ctx.pool == "ceil" else None,
                               out_dtype=ctx.x_dtype)
            if ctx.pool == "adaptive":
                dx = adaptive_pool_bwd_launch(dx, ctx.size)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            dw32, db32 = dwconv_wgrad(p, du, k, need_bias=ctx.has_bias)
            dw = dw32.to(weight.dtype) if ctx.needs_input_grad[1] else None
            db = db32.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


@backends.register("stage", "triton", usable=backends.triton_usable)
def stage_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mode: str = "scaled",
                 scale: float = 1.0, pool: str | None = None, size=None) -> torch.Tensor:
    """[pool →] depth-wise conv → gate on x [B, H, W, C] → [B, h, w, C/2] (Triton)."""
    _gate_id(mode)
    return StageNHWC.apply(x, weight, bias, mode, scale, pool, None if size is None else tuple(int(v) for v in size))


stage_reference = ops.stage_reference

__all__ = ["StageNHWC", "stage_triton", "stage_reference"]
