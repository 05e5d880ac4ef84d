"""Attention → ring masses in one fused pass, never materialising the N×N attention map.

For queries at grid positions (x, y) and image keys at (u, v) on an H×W token grid (row-major,
token t at (t // W, t % W)), with scores s = q·kᵀ·scale and the softmax taken over ALL Nk keys
(text keys of joint attention included):

    A[q, k]          = exp(s[q, k] − m_q) / l_q,    m_q = max_k s[q, k],  l_q = Σ_k exp(s[q, k] − m_q)
    ring_mass[q, r]  = Σ_{image keys k : max(|x−u|, |y−v|) = r} A[q, k],    r = 0 … R−1,  R = max(H, W)

so Σ_r ring_mass[q, r] = 1 − (mass on non-image keys).

The Triton kernel is flash-attention shaped. A program owns BLOCK_M queries of one (batch, head):

* pass 1 streams every key block (BLOCK_N keys) and keeps the online row max m and normaliser l;
* pass 2 streams the image keys one grid row u at a time (a W_PAD-wide block, W_PAD = next
  power of two ≥ W), recomputes p = exp(s − m) and bins it. For key row u the ring of key column v
  is max(dx, |v − y|) with dx = |x − u| fixed per query, so the row splits into
    - the keys with |v − y| ≤ dx, which all land in ring dx (one masked row sum), and
    - the rest, which land in ring |v − y|: ``tl.gather`` folds the row around the query's column,
      f[q, r] = p[q, y + r] + p[q, y − r], and f[q, r] is added to ring r for r > dx.
  Cost per key row is O(BLOCK_M · (d·W + R)), the same order as attention itself; no atomics.
* the [BLOCK_M, R] accumulator (fp32) is divided by l and written once.

Scores, max, normaliser and bins are all fp32 (fp16/bf16 inputs: tensor-core dot with fp32
accumulation; fp32 inputs: ``tf32x3``, i.e. about fp32 accuracy on tensor cores). The only memory traffic is q, k (k read twice) and
the [B, heads, Q, R] result. ``ring_mass_attention_reference`` computes the same thing in plain
PyTorch (chunked softmax + ``scatter_add_``); the tests compare the two.
"""
from __future__ import annotations

import math
import warnings

import torch

from attnprobe.core import backends
from attnprobe.stats import ring_distance

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["ring_mass_attention", "ring_mass_attention_reference", "triton_usable"]

INTERPRET = backends.interpreting()
triton_usable = backends.triton_usable  # the capability check of the Triton kernel


def _check_args(q, k, grid, query_index, key_slice):
    """Validate shapes; return (H, W, R, key_start, q_offset)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [B, heads, Nq, d] and k [B, heads, Nk, d]; got {tuple(q.shape)}, {tuple(k.shape)}")
    h, w = (int(g) for g in grid)
    nq, nk = q.shape[2], k.shape[2]
    start, stop = (0, nk) if key_slice is None else (int(key_slice[0]), int(key_slice[1]))
    if stop - start != h * w or start < 0 or stop > nk:
        raise ValueError(
            f"key_slice {(start, stop)} must select exactly H*W = {h * w} image keys inside Nk = {nk}; "
            "pass key_slice=(start, stop) for joint attention"
        )
    # Which q rows are the image queries: q holds either only the image tokens (Nq == H*W), or the
    # same token layout as k (joint attention), in which case image query i is row start + i.
    if nq == h * w:
        q_offset = 0
    elif nq == nk:
        q_offset = start
    else:
        raise ValueError(
            f"q has {nq} tokens: expected H*W = {h * w} (image queries only) or Nk = {nk} (same layout as k)"
        )
    if query_index.dim() != 1 or query_index.dtype not in (torch.int64, torch.int32):
        raise ValueError("query_index must be a 1-D integer tensor of grid positions")
    return h, w, max(h, w), start, q_offset


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def ring_mass_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int],
    query_index: torch.Tensor,
    scale: float | None = None,
    key_slice: tuple[int, int] | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Plain PyTorch ring masses: [B, heads, Q, R] (fp32, or fp64 for fp64 inputs)."""
    h, w, r_max, start, q_offset = _check_args(q, k, grid, query_index, key_slice)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    bsz, heads = q.shape[:2]
    pos = query_index.to(device=q.device, dtype=torch.long)
    out = torch.zeros((bsz, heads, pos.numel(), r_max), dtype=acc_dtype, device=q.device)
    kf = k.to(acc_dtype)
    for c0 in range(0, pos.numel(), chunk):
        pc = pos[c0 : c0 + chunk]  # [c]
        qc = q[:, :, q_offset + pc].to(acc_dtype)  # [B, heads, c, d]
        a = torch.softmax(qc @ kf.transpose(-1, -2) * scale, dim=-1)[..., start : start + h * w]  # [B, heads, c, HW]
        ring = ring_distance((h, w), pc)  # [c, HW]
        out[:, :, c0 : c0 + chunk].scatter_add_(-1, ring.expand_as(a), a)
    return out


# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------

if triton is not None:

    def _rm_configs():
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4)]
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=w, num_stages=2)
            for m, w in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 8))
        ]

    def _prune(configs, named_args, **kwargs):
        """Keep configs whose [BLOCK_M, max(W_PAD, R_PAD)] tiles hold ≤ 16 elements per thread
        (pass 2 keeps ~8 such tiles live; more spills), else the one with the fewest."""
        wide = max(kwargs.get("W_PAD", named_args.get("W_PAD", 16)), kwargs.get("R_PAD", named_args.get("R_PAD", 16)))
        per_thread = {id(c): c.kwargs["BLOCK_M"] * wide / (32 * c.num_warps) for c in configs}
        keep = [c for c in configs if per_thread[id(c)] <= 16]
        return keep or [min(configs, key=lambda c: per_thread[id(c)])]

    @triton.jit
    def _qk(q0, q1, k_base, kn, kmask, dd0, dd1, D, skn, skd, BLOCK_D1: tl.constexpr, FP32: tl.constexpr,
            K_ALIGN: tl.constexpr):
        """Scores q·kᵀ [BM, BN] (fp32) for the keys kn [BN]; the head dim is split BLOCK_D0 + BLOCK_D1.
        The key stride is passed divided by K_ALIGN so the compiler can prove aligned (vector) loads."""
        koff = kn.to(tl.int64)[None, :] * skn * K_ALIGN
        kt = tl.load(k_base + koff + dd0[:, None] * skd, mask=(dd0 < D)[:, None] & kmask[None, :], other=0.0)
        if FP32:
            s = tl.dot(q0, kt, input_precision="tf32x3")  # ~fp32 accuracy on tensor cores
        else:
            s = tl.dot(q0, kt)
        if BLOCK_D1 > 0:
            kt1 = tl.load(k_base + koff + dd1[:, None] * skd, mask=(dd1 < D)[:, None] & kmask[None, :], other=0.0)
            if FP32:
                s = tl.dot(q1, kt1, s, input_precision="tf32x3")
            else:
                s = tl.dot(q1, kt1, s)
        return s

    @triton.autotune(
        configs=_rm_configs(),
        key=["Nk", "D", "W_PAD", "R_PAD", "USE_GATHER"],
        prune_configs_by={"early_config_prune": _prune},
    )
    @triton.jit
    def _ring_mass_kernel(
        q_ptr,  # [B, heads, Nq, D]
        k_ptr,  # [B, heads, Nk, D]
        qi_ptr,  # [Q] int64 grid positions of the queries
        out_ptr,  # [B, heads, Q, R] fp32
        sqb, sqh, sqn, sqd,  # sqn, skn: token strides / K_ALIGN
        skb, skh, skn, skd,
        n_heads,
        Q,
        Nk,
        key_start,
        q_offset,
        H,
        W,
        R,
        qk_scale,  # softmax scale · log2(e): scores are kept in base-2 units
        D,
        K_ALIGN: tl.constexpr,  # key/query token strides are passed divided by this (8 when possible)
        BLOCK_D0: tl.constexpr,  # largest power of two ≤ D (≥ 16)
        BLOCK_D1: tl.constexpr,  # power of two ≥ D − BLOCK_D0 (0 if none left)
        W_PAD: tl.constexpr,
        R_PAD: tl.constexpr,
        FP32: tl.constexpr,
        USE_GATHER: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        hd = pid_bh % n_heads
        q_base = q_ptr + b.to(tl.int64) * sqb + hd.to(tl.int64) * sqh
        k_base = k_ptr + b.to(tl.int64) * skb + hd.to(tl.int64) * skh

        qm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query slots
        qmask = qm < Q
        pos = tl.load(qi_ptr + qm, mask=qmask, other=0).to(tl.int32)  # [BM] grid position
        x = pos // W  # query row
        y = pos % W  # query column
        qrow = (q_offset + pos).to(tl.int64)[:, None] * sqn * K_ALIGN
        dd0 = tl.arange(0, BLOCK_D0)
        q0 = tl.load(q_base + qrow + dd0[None, :] * sqd, mask=qmask[:, None] & (dd0 < D)[None, :], other=0.0)
        if BLOCK_D1 > 0:
            dd1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
            q1 = tl.load(q_base + qrow + dd1[None, :] * sqd, mask=qmask[:, None] & (dd1 < D)[None, :], other=0.0)
        else:
            dd1 = dd0
            q1 = q0

        # ---- pass 1: row max and normaliser over all Nk keys (online softmax) ----
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, Nk, BLOCK_N):
            nn = n0 + tl.arange(0, BLOCK_N)
            nm = nn < Nk
            s = _qk(q0, q1, k_base, nn, nm, dd0, dd1, D, skn, skd, BLOCK_D1, FP32, K_ALIGN)
            s = tl.where(nm[None, :], s * qk_scale, float("-inf"))  # [BM, BN]
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new

        # ---- pass 2: one image-grid row of keys at a time, binned into ℓ∞ rings ----
        vv = tl.arange(0, W_PAD)  # key column
        vm = vv < W
        rr = tl.arange(0, R_PAD)[None, :]  # [1, R_PAD] ring index
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for u in range(0, H):
            s = _qk(q0, q1, k_base, key_start + u * W + vv, vm, dd0, dd1, D, skn, skd, BLOCK_D1, FP32, K_ALIGN)
            p = tl.where(vm[None, :], tl.exp2(s * qk_scale - m_i[:, None]), 0.0)  # [BM, W_PAD] unnormalised
            dx = tl.abs(x - u)[:, None]  # [BM, 1] row distance
            dyv = tl.abs(vv[None, :] - y[:, None])  # [BM, W_PAD] column distance
            inbox = tl.sum(tl.where(dyv <= dx, p, 0.0), axis=1)  # [BM]: keys with |v−y| ≤ dx → ring dx
            acc += tl.where(rr == dx, inbox[:, None], 0.0)
            if USE_GATHER:
                # fold the row around the query column: f[q, r] = p[q, y + r] + p[q, y − r] (r > 0)
                yp = y[:, None] + rr  # [BM, R_PAD]
                ym = y[:, None] - rr
                f = tl.where(yp < W, tl.gather(p, tl.minimum(yp, W_PAD - 1), 1), 0.0)
                f += tl.where((ym >= 0) & (rr > 0), tl.gather(p, tl.maximum(ym, 0), 1), 0.0)
                acc += tl.where(rr > dx, f, 0.0)
            else:
                # fallback without tl.gather: one masked row sum per ring (R× more work)
                outside = dyv > dx
                for r in range(1, W):
                    f_r = tl.sum(tl.where(outside & (dyv == r), p, 0.0), axis=1)  # [BM]
                    acc += tl.where(rr == r, f_r[:, None], 0.0)

        out = acc / l_i[:, None]
        dst = out_ptr + (pid_bh.to(tl.int64) * Q + qm)[:, None] * R + rr
        tl.store(dst, out, mask=qmask[:, None] & (rr < R))


def _head_split(d: int) -> tuple[int, int]:
    """Head dim as two power-of-two dot blocks (tl.dot needs ≥ 16): 72 → (64, 16), 64 → (64, 0)."""
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (0 if rest == 0 else max(16, triton.next_power_of_2(rest)))


def _ring_mass_triton(q, k, grid, query_index, scale, key_slice, use_gather=True):
    h, w, r_max, start, q_offset = _check_args(q, k, grid, query_index, key_slice)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    bsz, heads, _, d = q.shape
    qi = query_index.to(device=q.device, dtype=torch.int64).contiguous()
    out = torch.empty((bsz, heads, qi.numel(), r_max), device=q.device, dtype=torch.float32)
    d0, d1 = _head_split(d)
    if out.numel() == 0:
        return out
    grid_fn = lambda meta: (triton.cdiv(qi.numel(), meta["BLOCK_M"]), bsz * heads)  # noqa: E731
    sq, sk = list(q.stride()), list(k.stride())
    align = 8 if sq[2] % 8 == 0 and sk[2] % 8 == 0 else 1
    sq[2] //= align
    sk[2] //= align
    _ring_mass_kernel[grid_fn](
        q, k, qi, out,
        *sq, *sk,
        heads, qi.numel(), k.shape[2], start, q_offset, h, w, r_max, float(scale) * math.log2(math.e), d,
        K_ALIGN=align,
        BLOCK_D0=d0,
        BLOCK_D1=d1,
        W_PAD=max(16, triton.next_power_of_2(w)),
        R_PAD=max(16, triton.next_power_of_2(r_max)),
        FP32=q.dtype == torch.float32,
        USE_GATHER=use_gather,
    )
    return out


_GATHER_BROKEN = False


def _ring_mass_triton_with_fallback(q, k, grid, query_index, scale=None, key_slice=None):
    """The Triton kernel; if ``tl.gather`` fails to *compile* here, the gather-free variant."""
    global _GATHER_BROKEN
    if not _GATHER_BROKEN:
        try:
            return _ring_mass_triton(q, k, grid, query_index, scale, key_slice, use_gather=True)
        except Exception as err:  # pragma: no cover - GPU/compiler specific
            # Only a failure to *compile* tl.gather falls back; anything else (bad input, OOM) is raised.
            if not (isinstance(err, triton.CompilationError) or "PassManager" in str(err)):
                raise
            warnings.warn(f"ring-mass kernel with tl.gather failed to compile ({err!r}); using the gather-free variant")
            _GATHER_BROKEN = True
    return _ring_mass_triton(q, k, grid, query_index, scale, key_slice, use_gather=False)


def _reference_fp32(q, k, grid, query_index, scale=None, key_slice=None):
    return ring_mass_attention_reference(q, k, grid, query_index, scale, key_slice).float()


backends.register("ring_mass_attention", "reference")(_reference_fp32)
if triton is not None:
    backends.register("ring_mass_attention", "triton", usable=backends.triton_usable)(_ring_mass_triton_with_fallback)


def ring_mass_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int],
    query_index: torch.Tensor,
    scale: float | None = None,
    key_slice: tuple[int, int] | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Ring masses of softmax(q kᵀ · scale) rows, without materialising the attention map.

    Args:
        q: [B, heads, Nq, d]; either only the H·W image queries (Nq = H·W) or the same token
            layout as ``k`` (joint attention; image query i is then row ``key_slice[0] + i``).
        k: [B, heads, Nk, d]; the softmax runs over all Nk keys.
        grid: (H, W) image token grid, row-major.
        query_index: LongTensor [Q] of image-query grid positions (row i // W, column i % W).
        scale: softmax scale, default 1/√d.
        key_slice: (start, stop) of the image keys in ``k`` (stop − start = H·W); default all keys.
        backend: ``None`` (the registry's choice, :mod:`attnprobe.core.backends`), "auto", "triton"
            or "reference".

    Returns:
        fp32 [B, heads, Q, R], R = max(H, W): out[..., q, r] = attention mass of query q on the
        image keys at ℓ∞ distance r.
    """
    return backends.call("ring_mass_attention", q, k, grid, query_index, scale, key_slice, backend=backend)
