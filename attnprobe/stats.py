"""Attention-map statistics: ℓ∞ ring masses, Butterworth high-pass, effective receptive field.

Notation: a layer attends over an H×W token grid (N = H·W, row-major: token i sits at row
i // W, column i % W). An attention *map* is one softmax row A[q, :] of length N.

* Ring mass. For a query at (x, y), key (u, v) lies on ring r = max(|x−u|, |y−v|) (ℓ∞).
  ``ring_mass[q, r] = Σ_{keys on ring r} A[q, k]``, r = 0 … R−1 with R = max(H, W).
  Computed from box sums on an integral image: box(r) = Σ over the (2r+1)² box clipped to
  the grid, ring(r) = box(r) − box(r−1). O(N) per map plus O(R) lookups; no N×N index.
* ASM curve. ASM(K = 2r+1) = Σ_{ρ ≤ r} ring[ρ] / Σ_ρ ring[ρ]: the share of mass inside the
  K×K box around the query.
* Butterworth high-pass. Λ = IFFT2( FFT2(A) · H ), H(u, v) = 1 / (1 + (D0 / D(u, v))^(2n)),
  D = √(u² + v²) in cycles per token (|u|, |v| ≤ ½), H(0, 0) = 0. Λ sums to ~0 (no DC), so
  the ASM over Λ uses its positive part by default (``abs`` optionally).
* ERF. The smallest odd K whose ASM reaches a fraction τ (default 0.8).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_KERNEL_RATIO",
    "DEFAULT_KMIN",
    "DEFAULT_KMAX",
    "AUTO_QUERIES",
    "parse_queries",
    "query_positions",
    "box_mass",
    "ring_mass",
    "ring_distance",
    "ring_sums",
    "BORDERS",
    "butterworth_filter",
    "butterworth_highpass",
    "highpass_operator",
    "DENSE_MAX_TOKENS",
    "effective_receptive_field",
    "recommended_kernel_size",
    "asm_from_rings",
]


DEFAULT_THRESHOLD = 0.8  # τ: the ERF is the smallest K whose high-pass ASM reaches τ
DEFAULT_KERNEL_RATIO = 0.6  # k = odd(ceil(ratio · ERF)): the ½-scale stage doubles the block's reach
DEFAULT_KMIN, DEFAULT_KMAX = 3, 31
AUTO_QUERIES = 144  # target queries per layer for queries="auto"


def _as_rows_cols(positions: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (Q,) or (row, col) pairs (Q, 2) → rows (Q,), cols (Q,)."""
    h, w = grid
    positions = torch.as_tensor(positions)
    if positions.ndim == 2 and positions.shape[-1] == 2:
        rows, cols = positions[:, 0].long(), positions[:, 1].long()
    elif positions.ndim == 1:
        rows, cols = positions.long() // w, positions.long() % w
    else:
        raise ValueError(f"query positions must be (Q,) flat indices or (Q, 2) (row, col); got {tuple(positions.shape)}")
    if len(rows) and (rows.min() < 0 or rows.max() >= h or cols.min() < 0 or cols.max() >= w):
        raise ValueError(f"query positions fall outside the {h}x{w} grid")
    return rows, cols


def query_positions(grid: tuple[int, int], device=None) -> torch.Tensor:
    """Flat indices of all N = H·W grid positions (the default: query i at token i)."""
    return torch.arange(grid[0] * grid[1], device=device)


def box_mass(maps: torch.Tensor, grid: tuple[int, int], positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mass inside the (2r+1)² box around each query, r = 0 … R−1.

    maps: (..., Q, H*W) attention rows; positions: (Q,) flat indices or (Q, 2) rows/cols
    (default: query q at token q, so Q must equal H*W). Returns (..., Q, R), R = max(H, W).
    """
    h, w = grid
    if maps.shape[-1] != h * w:
        raise ValueError(f"maps have {maps.shape[-1]} keys but the grid {h}x{w} has {h * w}")
    q = maps.shape[-2]
    if positions is None:
        if q != h * w:
            raise ValueError("pass the query positions when maps do not hold one row per grid token")
        positions = query_positions(grid, maps.device)
    rows, cols = _as_rows_cols(positions, grid)
    if len(rows) != q:
        raise ValueError(f"{len(rows)} query positions for {q} map rows")
    rows, cols = rows.to(maps.device), cols.to(maps.device)
    lead = maps.shape[:-2]
    x = maps.reshape(-1, q, h, w)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    # Integral image S[a, b] = Σ_{i<a, j<b} x[i, j], shape (M, Q, H+1, W+1).
    s = torch.nn.functional.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    big_r = max(h, w)
    r = torch.arange(big_r, device=maps.device)
    r0 = (rows[:, None] - r).clamp(min=0)  # (Q, R) first row inside the box
    r1 = (rows[:, None] + r).clamp(max=h - 1) + 1  # one past the last row
    c0 = (cols[:, None] - r).clamp(min=0)
    c1 = (cols[:, None] + r).clamp(max=w - 1) + 1
    flat = s.reshape(s.shape[0], q, -1)  # (M, Q, (H+1)(W+1))
    w1 = w + 1

    def at(a, b):
        return flat.gather(-1, (a * w1 + b).expand(flat.shape[0], q, big_r))

    out = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    return out.reshape(*lead, q, big_r)


def ring_mass(maps: torch.Tensor, grid: tuple[int, int], positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mass per ℓ∞ ring distance: (..., Q, H*W) → (..., Q, R), R = max(H, W) (see module doc)."""
    box = box_mass(maps, grid, positions)
    return torch.cat([box[..., :1], box[..., 1:] - box[..., :-1]], dim=-1)


def ring_distance(grid: tuple[int, int], positions: torch.Tensor) -> torch.Tensor:
    """ℓ∞ ring of every key around each query: (Q, H*W) int64, max(|row − row_k|, |col − col_k|)."""
    h, w = grid
    rows, cols = _as_rows_cols(positions, grid)
    keys = torch.arange(h * w, device=rows.device)
    return torch.maximum((rows[:, None] - keys // w).abs(), (cols[:, None] - keys % w).abs())


def ring_sums(maps: torch.Tensor, distance: torch.Tensor, rings: int) -> torch.Tensor:
    """``ring_mass(maps).sum((0, 2))`` in float64 for maps (B, heads, Q, N): rings summed over batch and queries.

    One pass that adds each key's mass to its ring (``distance`` from :func:`ring_distance`), instead of
    integral images per map: the capture needs only these sums. Returns (heads, rings).
    """
    heads = maps.shape[1]
    flat = maps.sum(0, dtype=torch.float64).reshape(heads, -1)  # (heads, Q·N)
    out = torch.zeros(heads, rings, dtype=torch.float64, device=maps.device)
    return out.index_add_(1, distance.reshape(-1).to(maps.device), flat)


BORDERS = ("zero", "circular")


def butterworth_filter(grid: tuple[int, int], cutoff: float = 0.1, order: int = 2, device=None,
                       border: str = "circular") -> torch.Tensor:
    """Real-FFT-layout high-pass response H(u, v); H(0, 0) = 0.

    Shape (H, W//2 + 1) for ``border="circular"`` (the FFT wraps: a query at the left edge sees
    the right edge as its neighbour), (2H, W + 1) for ``border="zero"`` (the map is zero-padded to
    2H × 2W before filtering, so nothing wraps). Frequencies are in cycles per token either way.
    """
    if cutoff <= 0:
        raise ValueError("Butterworth cut-off must be > 0 (cycles per token, at most ~0.7)")
    if order < 1:
        raise ValueError("Butterworth order must be ≥ 1")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    h, w = grid
    if border == "zero":
        h, w = 2 * h, 2 * w
    fu = torch.fft.fftfreq(h, device=device, dtype=torch.float64)[:, None]
    fv = torch.fft.rfftfreq(w, device=device, dtype=torch.float64)[None, :]
    d = torch.sqrt(fu**2 + fv**2)
    resp = 1.0 / (1.0 + (cutoff / d) ** (2 * order))  # d = 0 gives inf → 0
    resp[0, 0] = 0.0
    return resp


def butterworth_highpass(
    maps: torch.Tensor, grid: tuple[int, int], cutoff: float = 0.1, order: int = 2, response: torch.Tensor | None = None,
    border: str = "circular",
) -> torch.Tensor:
    """High-pass filter each map: (..., H*W) → (..., H*W), same dtype (computed in ≥ fp32).

    ``border="zero"`` pads each map with zeros to 2H × 2W, filters, and crops the H × W
    window back (``response`` must then come from ``butterworth_filter(..., border="zero")``).
    """
    h, w = grid
    if maps.shape[-1] != h * w:
        raise ValueError(f"maps have {maps.shape[-1]} values but the grid {h}x{w} has {h * w}")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    work = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    if response is None:
        response = butterworth_filter(grid, cutoff, order, device=maps.device, border=border)
    size = (2 * h, 2 * w) if border == "zero" else (h, w)
    if response.shape != (size[0], size[1] // 2 + 1):
        raise ValueError(f"filter response of shape {tuple(response.shape)} does not fit a {border}-border {h}x{w} grid")
    spec = torch.fft.rfft2(work.reshape(*work.shape[:-1], h, w), s=size)  # s pads with zeros at the end
    out = torch.fft.irfft2(spec * response.to(work.dtype), s=size)[..., :h, :w]
    return out.reshape(maps.shape).to(maps.dtype)


DENSE_MAX_TOKENS = 4096  # up to 64×64 tokens the zero-border high-pass runs as one (N, N) matmul (≤ 64 MB fp32)
_OPERATORS: dict = {}


def highpass_operator(grid: tuple[int, int], cutoff: float = 0.1, order: int = 2, border: str = "zero",
                      device=None, dtype=torch.float32) -> torch.Tensor:
    """The high-pass as a dense (N, N) matrix M with Λ(A) = A @ M (row k = the filtered unit map e_k).

    Built once per (grid, cut-off, order, border, device, dtype) in float64 from
    :func:`butterworth_highpass`, so it is the same filter; on CPU a zero-border map batch costs one
    GEMM instead of 2H × 2W FFTs (5× faster at 32×32 tokens, measured in benchmarks/RESULTS.md).
    """
    key = (tuple(grid), float(cutoff), int(order), border, str(device), dtype)
    if key not in _OPERATORS:
        n = grid[0] * grid[1]
        eye = torch.eye(n, dtype=torch.float64)
        op = butterworth_highpass(eye, grid, cutoff, order, border=border)
        while _OPERATORS and sum(t.numel() * t.element_size() for t in _OPERATORS.values()) + op.numel() * 4 > 2**29:
            _OPERATORS.pop(next(iter(_OPERATORS)))  # oldest first: at most ~512 MB of operators are kept
        _OPERATORS[key] = op.to(device=device, dtype=dtype).contiguous()
    return _OPERATORS[key]


def asm_from_rings(rings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Normalised cumulative curve ASM(K=2r+1) from ring masses (..., R); zeros if empty."""
    rings = np.asarray(rings, dtype=np.float64)
    cum = np.cumsum(rings, axis=-1)
    total = cum[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(total > 0, cum / np.where(total > 0, total, 1.0), 0.0)
    return curve


def effective_receptive_field(asm_curve, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Smallest odd K = 2r+1 with ASM(K) ≥ threshold · ASM(∞).

    ``asm_curve[r]`` is the (possibly unnormalised) cumulative mass inside the (2r+1)² box;
    it is normalised by its last value.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold τ must be in (0, 1]; got {threshold}")
    curve = np.asarray(asm_curve, dtype=np.float64).ravel()
    if curve.size == 0 or not np.all(np.isfinite(curve)):
        raise ValueError("ASM curve is empty or not finite")
    total = curve[-1]
    if total <= 0:
        raise ValueError("ASM curve has no mass")
    reached = np.nonzero(curve / total >= threshold - 1e-9)[0]
    r = int(reached[0]) if reached.size else curve.size - 1
    return 2 * r + 1


def recommended_kernel_size(erf: int, ratio: float = DEFAULT_KERNEL_RATIO, kmin: int = DEFAULT_KMIN,
                            kmax: int = DEFAULT_KMAX) -> int:
    """k = odd(ceil(ratio · ERF)) clamped to [kmin, kmax] (both forced odd)."""
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"kernel ratio must be a finite number > 0, got {ratio}")
    if kmin > kmax:
        raise ValueError(f"kmin {kmin} > kmax {kmax}")
    k = math.ceil(ratio * erf - 1e-9)
    k += (k + 1) % 2  # next odd
    kmin += (kmin + 1) % 2
    kmax -= (kmax + 1) % 2
    return int(min(max(k, kmin), kmax))


def _lattice(n: int, stride: int) -> torch.Tensor:
    """ceil((n − 1) / stride) + 1 positions from 0 to n − 1, spaced as evenly as integers allow.

    The lattice is symmetric about the centre (as far as integers allow) and touches both borders (a plain 0, S, 2S, ...
    range never samples the last row when S does not divide n − 1).
    """
    if n == 1 or stride == 1:
        return torch.arange(n)
    m = -(-(n - 1) // stride) + 1
    x = np.linspace(0, n - 1, m)
    near = np.floor(x + 0.5)  # round half up on the first half, mirrored on the second half
    pos = np.where(x <= (n - 1) / 2, near, (n - 1) - np.floor((n - 1 - x) + 0.5)).astype(np.int64)
    return torch.from_numpy(np.unique(pos))


def parse_queries(spec, grid: tuple[int, int]) -> torch.Tensor:
    """Query positions (flat indices into the grid) for a query spec.

    ``"all"``; ``"stride:S"`` (rows and columns about S apart, S ≥ 1, on a lattice centred on
    the grid that includes the first and last row and column); ``"sample:N"`` (N positions
    drawn uniformly without replacement, seeded by the grid so shards agree); ``"auto"``
    (the stride S = round(√(N / 144)) that keeps roughly 100–200 queries per layer: all queries
    on a 16×16 grid, stride 3 on 32×32, 5 on 64×64; measured to keep analysed generation within
    ~2× of plain generation on CPU, see benchmarks/RESULTS.md). Statistics are summed over heads,
    batch, steps and prompts, so a regular sub-lattice of queries is plenty for the ASM curves.
    """
    h, w = grid
    n = h * w
    spec = str(spec).strip().lower()
    if spec == "auto":
        stride = max(1, round(math.sqrt(n / AUTO_QUERIES)))
        spec = f"stride:{stride}"
    if spec == "all":
        return torch.arange(n)
    kind, _, value = spec.partition(":")
    try:
        v = int(value)
    except ValueError:
        v = 0
    if kind == "stride" and v >= 1:
        rows, cols = _lattice(h, v), _lattice(w, v)
        return (rows[:, None] * w + cols[None, :]).reshape(-1)
    if kind == "sample" and v >= 1:
        g = torch.Generator().manual_seed(1_000_003 * h + w)
        return torch.randperm(n, generator=g)[: min(v, n)].sort().values
    raise ValueError(f"bad --queries {spec!r}: use 'all', 'auto', 'stride:S' or 'sample:N' with a positive integer")
