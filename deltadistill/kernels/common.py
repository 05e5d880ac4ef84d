"""Shared pieces of the element-wise ΔConvBlock kernels: launch configs, the gate maths, bilinear indices."""
from __future__ import annotations

import triton
import triton.language as tl

from deltadistill.kernels.dwconv import GATE_MODES, _cfg, _configs

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

