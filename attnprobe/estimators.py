"""Estimators on top of the ring statistics: the query-independent prior (bias share), ERF
uncertainty (bootstrap intervals, ASM margin), global layers, the step-averaged map
(``--aggregate mean-map``) and key coverage. Formulas and options: README "Statistics".
"""
from __future__ import annotations

import numpy as np
import torch

from attnprobe.stats import DEFAULT_THRESHOLD, butterworth_filter, butterworth_highpass, ring_mass

__all__ = ["far_radii", "GLOBAL_SHARE", "prior_share", "bootstrap_erf", "asm_margin", "AGGREGATES", "mean_map_rings",
           "key_coverage"]


# ----------------------------------------------------------------------------------------------
# The query-independent prior, uncertainty, global layers
# ----------------------------------------------------------------------------------------------

def far_radii(grid: tuple[int, int]) -> tuple[int, ...]:
    """The ℓ∞ radii beyond which a query counts as far from a key: 1, 2, 4, ... below max(H, W)."""
    out, r = [], 1
    while r < max(grid):
        out.append(r)
        r *= 2
    return tuple(out)


GLOBAL_SHARE = 0.02  # a layer whose high-pass (local) mass is below this share of its mass is "global"


def prior_share(far_key_mass: np.ndarray, far_rows: np.ndarray, radii, reach: int) -> float:
    """Share of attention mass explained by a query-independent prior b (the bias share).

    Model: A[q, k] = α · p_k + (1 − α) · r_q(k), p a distribution over keys (the prior), r_q a local
    distribution that vanishes beyond ``reach`` (ℓ∞ rings) from the query. For any query farther
    than r0 ≥ reach from key k, A[q, k] = α · p_k, so the mean attention key k receives from its
    far queries is α · p_k, and summing over keys gives α = Σ_k mean_{q far}(A[q, k]).
    ``far_key_mass[f, k]`` / ``far_rows[f, k]`` is that mean for far = farther than ``radii[f]``;
    the smallest radius ≥ ``reach`` is used (the largest available if none is), and a key with no
    query that far falls back to the next smaller radius.
    """
    radii = list(radii)
    if not radii:
        return float("nan")
    fmk, frows = np.asarray(far_key_mass, float), np.asarray(far_rows, float)
    f = next((i for i, r in enumerate(radii) if r >= reach), len(radii) - 1)
    per_key = np.full(fmk.shape[1], np.nan)
    for i in range(f, -1, -1):  # fall back to smaller radii for keys with no far query
        fill = np.isnan(per_key) & (frows[i] > 0)
        per_key[fill] = fmk[i, fill] / frows[i, fill]
    per_key = np.nan_to_num(per_key, nan=0.0)
    return float(np.clip(per_key.sum(), 0.0, 1.0))


def bootstrap_erf(rings: np.ndarray, threshold: float = DEFAULT_THRESHOLD, samples: int = 1000, seed: int = 0,
                  level: float = 0.9) -> tuple[int, int] | None:
    """(low, high) of a ``level`` percentile interval of the ERF over resamples of the rows of ``rings`` [P, R]
    (per-prompt high-pass ring sums) with replacement; None with fewer than two rows."""
    rings = np.asarray(rings, dtype=np.float64)
    if rings.ndim != 2 or len(rings) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rings), size=(samples, len(rings)))
    sums = rings[idx].sum(1)  # (samples, R)
    cum = np.cumsum(sums, axis=1)
    total = cum[:, -1:]
    ok = total[:, 0] > 0
    if not ok.any():
        return None
    reached = cum[ok] / total[ok] >= threshold - 1e-9
    erfs = 2 * reached.argmax(axis=1) + 1
    lo = np.percentile(erfs, 50 * (1 - level), method="lower")  # sample values: odd like every ERF
    hi = np.percentile(erfs, 50 * (1 + level), method="higher")
    return int(lo), int(hi)


def asm_margin(curve, erf: int, threshold: float = DEFAULT_THRESHOLD) -> float:
    """How far the ERF is from flipping: min(ASM(ERF) − τ, τ − ASM(ERF − 2)) on the normalised curve."""
    curve = np.asarray(curve, dtype=np.float64)
    if erf < 1 or curve.size == 0 or curve[-1] <= 0:
        return float("nan")
    c = curve / curve[-1]
    r = (erf - 1) // 2
    above = c[r] - threshold
    below = threshold - c[r - 1] if r >= 1 else float("inf")
    return float(min(above, below))


# ----------------------------------------------------------------------------------------------
# Aggregation: the paper's step-averaged map
# ----------------------------------------------------------------------------------------------

AGGREGATES = ("per-map", "mean-map")


def mean_map_rings(map_sum, grid: tuple[int, int], positions, *, cutoff: float = 0.1, order: int = 2,
                   border: str = "zero", highpass_mass: str = "positive", threshold: float = DEFAULT_THRESHOLD,
                   samples: int | None = None, seed: int = 0, level: float = 0.9) -> dict:
    """High-pass ring statistics of the aggregated map (``--aggregate mean-map``).

    ``map_sum`` [T, G, Q, N] holds Σ A[q, k] over batch, heads, steps and prompts, per timestep
    bucket t and prompt group g. The aggregated map of bucket t is M_t = Σ_g map_sum[t, g]
    (a sum, not a mean: ring shares are scale-free). Returns

    * ``bucket_rings`` [T, R]: rings of Λ(M_t)⁺ (or |Λ| with ``highpass_mass="abs"``),
    * ``rings`` [R]: rings of Λ(Σ_t M_t)⁺, the map averaged over every step,
    * ``hp_mass``: Σ Λ(Σ_t M_t)⁺ (same units as the map's mass),
    * ``interval``: a ``level`` bootstrap interval of the ERF over prompt groups (resampled with
      replacement, the map rebuilt from the resampled groups each time), None with one group.

    Λ is linear, so each group is filtered once and a resample is a weighted sum of filtered groups.
    """
    m = torch.as_tensor(np.asarray(map_sum), dtype=torch.float64)
    t, g, q, n = m.shape
    positions = torch.as_tensor(positions)
    resp = butterworth_filter(grid, cutoff, order, border=border)

    def bins(lam: torch.Tensor) -> torch.Tensor:  # (..., Q, N) filtered → (..., R)
        part = lam.clamp(min=0) if highpass_mass == "positive" else lam.abs()
        return ring_mass(part, grid, positions).sum(-2)

    per_group = butterworth_highpass(m.sum(0), grid, response=resp, border=border)  # (G, Q, N)
    total = per_group.sum(0)
    out = {
        "bucket_rings": bins(butterworth_highpass(m.sum(1), grid, response=resp, border=border)).numpy(),
        "rings": bins(total).numpy(),
        "hp_mass": float(total.clamp(min=0).sum()) if highpass_mass == "positive" else float(total.abs().sum()),
        "interval": None,
    }
    if g < 2 or not (m.sum(1).sum() > 0):
        return out
    if samples is None:  # about 2·10⁹ multiply-adds in all, 100 … 1000 resamples
        samples = int(min(1000, max(100, 2e9 // max(g * q * n, 1))))
    rng = np.random.default_rng(seed)
    weights = torch.from_numpy(np.stack([np.bincount(rng.integers(0, g, g), minlength=g) for _ in range(samples)]))
    erfs = []
    chunk = max(1, int(2**26 // max(q * n, 1)))
    for s0 in range(0, samples, chunk):
        w = weights[s0 : s0 + chunk].to(torch.float64)  # (S, G)
        rings = bins(torch.einsum("sg,gqn->sqn", w, per_group)).numpy()  # (S, R)
        cum = np.cumsum(rings, axis=1)
        ok = cum[:, -1] > 0
        reached = cum[ok] / cum[ok, -1:] >= threshold - 1e-9
        erfs.extend((2 * reached.argmax(axis=1) + 1).tolist())
    if erfs:
        out["interval"] = (int(np.percentile(erfs, 50 * (1 - level), method="lower")),
                           int(np.percentile(erfs, 50 * (1 + level), method="higher")))
    return out


def key_coverage(ring_total, key_mass_total: float, grid: tuple[int, int], positions) -> np.ndarray:
    """(N,) mass each key would receive if every sampled query spread the layer's mean ring profile
    evenly over its own keys on each ring: Σ_q ρ[d(q, k)] / n_q(d(q, k)), with ρ[r] = ring mass per
    query, n_q(r) = keys on ring r around q inside the grid, d = ℓ∞ distance. Rescaled to sum to
    ``key_mass_total`` (they agree for a capture). key mass / coverage is free of the query lattice's
    pattern and of most border effects; a sink stands out as ≫ 1.
    """
    h, w = grid
    big_r = max(grid)
    pos = np.asarray(positions)
    rr, cc = np.divmod(np.arange(h * w), w)
    d = np.maximum(np.abs(rr[None] - rr[pos][:, None]), np.abs(cc[None] - cc[pos][:, None]))  # (Q, N)
    flat = (np.arange(len(pos))[:, None] * big_r + d).ravel()
    n_q = np.bincount(flat, minlength=len(pos) * big_r).reshape(len(pos), big_r)  # keys per ring per query
    rho = np.asarray(ring_total, dtype=np.float64) / max(len(pos), 1)
    share = rho[None, :] / np.maximum(n_q, 1)  # (Q, R) mass per key on each ring of each query
    cov = np.take_along_axis(share, d, axis=1).sum(0)
    total = cov.sum()
    return cov * (key_mass_total / total) if total > 0 else cov
