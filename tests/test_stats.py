"""attnprobe.stats against brute-force references (explicit loops, numpy FFT, analytic ERFs)."""
import numpy as np
import pytest
import torch

from attnprobe.stats import (
    box_mass,
    butterworth_highpass,
    effective_receptive_field,
    recommended_kernel_size,
    ring_distance,
    ring_mass,
    ring_sums,
)


def ring_mass_loop(maps, grid, positions):
    """Explicit double loop over keys: the definition of ℓ∞ ring mass."""
    h, w = grid
    out = np.zeros((len(positions), max(h, w)))
    for qi, p in enumerate(positions):
        x, y = divmod(int(p), w)
        for u in range(h):
            for v in range(w):
                out[qi, max(abs(x - u), abs(y - v))] += maps[qi, u * w + v]
    return out


@pytest.mark.parametrize("grid", [(5, 5), (4, 7), (9, 3), (1, 6)])
def test_ring_mass_matches_double_loop(grid):
    g = torch.Generator().manual_seed(sum(grid))
    h, w = grid
    positions = torch.randperm(h * w, generator=g)[: min(6, h * w)]
    positions[0] = 0  # a corner
    positions[-1] = h * w - 1  # the opposite corner
    maps = torch.rand(len(positions), h * w, generator=g, dtype=torch.float64)
    got = ring_mass(maps, grid, positions).numpy()
    want = ring_mass_loop(maps.numpy(), grid, positions.tolist())
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # (row, col) positions give the same answer as flat indices
    rc = torch.stack([positions // w, positions % w], 1)
    np.testing.assert_allclose(ring_mass(maps, grid, rc).numpy(), want, rtol=1e-12, atol=1e-12)


def test_ring_mass_all_queries_and_leading_dims():
    grid = (4, 6)
    maps = torch.softmax(torch.randn(2, 3, 24, 24, dtype=torch.float64), -1)  # (B, heads, Q=N, N)
    got = ring_mass(maps, grid)
    assert got.shape == (2, 3, 24, 6)
    want = ring_mass_loop(maps[1, 2].numpy(), grid, list(range(24)))
    np.testing.assert_allclose(got[1, 2].numpy(), want, rtol=1e-10, atol=1e-12)
    # rings partition the row: they sum to the row mass (1 after softmax)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("grid", [(5, 5), (4, 7), (9, 3)])
def test_ring_sums_match_the_double_loop_summed(grid):
    # the capture's one-pass sums: Σ over batch and queries of the ring masses, per head
    g = torch.Generator().manual_seed(7 + sum(grid))
    h, w = grid
    positions = torch.randperm(h * w, generator=g)[:5]
    dist = ring_distance(grid, positions)
    assert dist.shape == (5, h * w) and dist.dtype == torch.int64
    for qi, p in enumerate(positions.tolist()):
        x, y = divmod(p, w)
        assert dist[qi].tolist() == [max(abs(x - u), abs(y - v)) for u in range(h) for v in range(w)]
    # (row, col) positions give the same rings as flat indices
    assert torch.equal(ring_distance(grid, torch.stack([positions // w, positions % w], 1)), dist)
    maps = torch.rand(3, 2, 5, h * w, generator=g)  # fp32 (B, heads, Q, N), as the capture passes them
    got = ring_sums(maps, dist, max(grid))
    assert got.dtype == torch.float64 and got.shape == (2, max(grid))
    m64 = maps.double().numpy()
    want = np.stack([sum(ring_mass_loop(m64[b, hd], grid, positions.tolist()).sum(0) for b in range(3))
                     for hd in range(2)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_ring_mass_float32_close_to_float64():
    grid = (32, 32)
    maps = torch.softmax(torch.randn(8, 1024, dtype=torch.float64) * 3, -1)
    pos = torch.arange(0, 1024, 128)
    ref = ring_mass(maps, grid, pos)
    got = ring_mass(maps.float(), grid, pos).double()
    assert (got - ref).abs().max() < 1e-6


def test_ring_mass_rejects_bad_shapes():
    with pytest.raises(ValueError, match="grid"):
        ring_mass(torch.rand(2, 10), (3, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        ring_mass(torch.rand(2, 9), (3, 3), torch.tensor([0, 9]))


def highpass_numpy(maps, grid, cutoff, order):
    h, w = grid
    fu = np.fft.fftfreq(h)[:, None]
    fv = np.fft.fftfreq(w)[None, :]
    d = np.hypot(fu, fv)
    with np.errstate(divide="ignore"):
        hresp = 1.0 / (1.0 + (cutoff / d) ** (2 * order))
    hresp[0, 0] = 0.0
    x = maps.reshape(-1, h, w)
    return np.real(np.fft.ifft2(np.fft.fft2(x) * hresp)).reshape(maps.shape)


@pytest.mark.parametrize("grid,cutoff,order", [((8, 8), 0.1, 2), ((6, 10), 0.25, 1), ((7, 5), 0.05, 4)])
def test_butterworth_matches_numpy_fft(grid, cutoff, order):
    rng = np.random.default_rng(0)
    maps = rng.random((3, grid[0] * grid[1]))
    got = butterworth_highpass(torch.from_numpy(maps), grid, cutoff, order).numpy()
    np.testing.assert_allclose(got, highpass_numpy(maps, grid, cutoff, order), atol=1e-12)
    # DC removed: each filtered map sums to zero
    np.testing.assert_allclose(got.sum(-1), 0.0, atol=1e-10)


def test_butterworth_keeps_shape_and_dtype():
    maps = torch.rand(2, 3, 4, 20, dtype=torch.float32)
    out = butterworth_highpass(maps, (4, 5))
    assert out.shape == maps.shape and out.dtype == torch.float32


def box_map(grid, center, r):
    h, w = grid
    m = np.zeros((h, w))
    x, y = center
    m[max(0, x - r) : x + r + 1, max(0, y - r) : y + r + 1] = 1.0
    return (m / m.sum()).ravel()


@pytest.mark.parametrize("r", [1, 2, 4, 7])
def test_erf_uniform_box_interior(r):
    grid = (31, 33)
    center = (15, 16)
    maps = torch.from_numpy(box_map(grid, center, r))[None]
    curve = box_mass(maps, grid, torch.tensor([center[0] * 33 + center[1]]))[0].numpy()
    # the box holds all the mass at radius r and strictly less at r-1
    assert effective_receptive_field(curve, 1.0) == 2 * r + 1
    for tau in (0.3, 0.6, 0.8, 0.95):
        want_r = next(k for k in range(r + 1) if (2 * k + 1) ** 2 / (2 * r + 1) ** 2 >= tau - 1e-12)
        assert effective_receptive_field(curve, tau) == 2 * want_r + 1


def test_erf_uniform_box_at_border_and_nonsquare():
    grid = (6, 11)
    center = (0, 10)  # top-right corner: the box is clipped to (r+1)²
    r = 3
    maps = torch.from_numpy(box_map(grid, center, r))[None]
    curve = box_mass(maps, grid, torch.tensor([center[0] * 11 + center[1]]))[0].numpy()
    assert effective_receptive_field(curve, 1.0) == 2 * r + 1
    # at radius k the clipped box holds (k+1)² of the (r+1)² cells
    for tau in (0.2, 0.5, 0.8):
        want_r = next(k for k in range(r + 1) if (k + 1) ** 2 / (r + 1) ** 2 >= tau - 1e-12)
        assert effective_receptive_field(curve, tau) == 2 * want_r + 1


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_erf_gaussian_known_sigma(sigma):
    grid = (61, 61)
    c = 30
    i = np.arange(61) - c
    g1 = np.exp(-(i**2) / (2 * sigma**2))
    m = np.outer(g1, g1)
    maps = torch.from_numpy((m / m.sum()).ravel())[None]
    curve = box_mass(maps, grid, torch.tensor([c * 61 + c]))[0].numpy()
    tau = 0.8
    # separable: the box mass is the square of the 1-D central mass
    share1d = np.array([g1[c - k : c + k + 1].sum() for k in range(c + 1)]) / g1.sum()
    want_r = int(np.nonzero(share1d**2 >= tau)[0][0])
    assert effective_receptive_field(curve, tau) == 2 * want_r + 1
    # and close to the continuous answer: (erf((r+½)/(σ√2)))² = τ
    from scipy.special import erfinv

    r_cont = np.sqrt(2) * sigma * erfinv(np.sqrt(tau)) - 0.5
    assert abs(want_r - r_cont) <= 1.0


def test_erf_input_validation():
    with pytest.raises(ValueError):
        effective_receptive_field([], 0.8)
    with pytest.raises(ValueError):
        effective_receptive_field([0.0, 0.0], 0.8)
    with pytest.raises(ValueError):
        effective_receptive_field([0.5, 1.0], 1.5)


@pytest.mark.parametrize(
    "erf,ratio,kmin,kmax,want", [(21, 0.6, 3, 31, 13), (5, 0.6, 3, 31, 3), (63, 0.6, 3, 31, 31), (9, 1.0, 3, 31, 9), (7, 0.5, 5, 30, 5)]
)
def test_recommended_kernel_size(erf, ratio, kmin, kmax, want):
    assert recommended_kernel_size(erf, ratio, kmin, kmax) == want
