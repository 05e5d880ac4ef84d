"""The bias/local decomposition, global layers and ERF uncertainty on synthetic maps of known answer."""
import numpy as np
import pytest
import torch

from attnprobe.estimators import asm_margin, bootstrap_erf, far_radii, prior_share
from brute import highpass_numpy, rings_brute

GRID = (16, 16)
N = GRID[0] * GRID[1]
ROWS, COLS = np.divmod(np.arange(N), GRID[1])
DIST = np.maximum(np.abs(ROWS[:, None] - ROWS[None]), np.abs(COLS[:, None] - COLS[None]))  # (N, N) ℓ∞


def _box(radius):
    m = (DIST <= radius).astype(float)
    return m / m.sum(1, keepdims=True)


def _gauss(sigma):
    d2 = (ROWS[:, None] - ROWS[None]) ** 2 + (COLS[:, None] - COLS[None]) ** 2
    m = np.exp(-d2 / (2 * sigma**2))
    return m / m.sum(1, keepdims=True)


def _far(maps):
    """The capture's far-field accumulators, brute force: (F, N) mass and row counts."""
    radii = far_radii(GRID)
    fkm = np.stack([(maps * (DIST > r)).sum(0) for r in radii])
    frows = np.stack([(DIST > r).sum(0).astype(float) for r in radii])
    return fkm, frows, radii


PRIOR_UNIFORM = np.full(N, 1 / N)
PRIOR_SINK = np.eye(N)[5 * 16 + 11]
bump = np.exp(-((ROWS - 4) ** 2 + (COLS - 12) ** 2) / (2 * 5.0**2))
PRIOR_SMOOTH = bump / bump.sum()


@pytest.mark.parametrize("local,prior,alpha,reach", [
    (_box(1), PRIOR_UNIFORM, 0.3, 2),
    (_box(2), PRIOR_SINK, 0.25, 3),
    (_gauss(1.0), PRIOR_SMOOTH, 0.4, 5),
    (_box(1), PRIOR_UNIFORM, 0.0, 2),
    (_box(1), PRIOR_UNIFORM, 1.0, 2),
])
def test_prior_share_recovers_the_mixture_weight(local, prior, alpha, reach):
    maps = alpha * prior[None, :] + (1 - alpha) * local  # (Q = N, N): every query
    share = prior_share(*_far(maps), reach=reach)
    assert share == pytest.approx(alpha, abs=0.02)
    # what the old "1 − positive high-pass share" called bias share is far off for a purely
    # local box: it reports a sizeable "bias" where there is none
    if alpha == 0.0:
        lam = np.clip(highpass_numpy(maps, GRID, 0.1, 2), 0, None)
        assert 1 - lam.sum() / maps.sum() > 0.1 > share + 0.05


def test_capture_far_field_matches_brute_force():
    from attnprobe.capture import LayerAccumulator
    from attnprobe.core.sites import AttnSite

    class Fake:
        prompt = 0

        def base_grid(self):
            return (5, 7)

        def bucket(self):
            return 0

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 35, 8, generator=g), torch.randn(2, 3, 35, 8, generator=g)
    acc = LayerAccumulator(site=AttnSite("x", "x", "fake"), buckets=1, highpass_mass="positive", cutoff=0.15, order=2,
                           queries="stride:2", probe_points=[], memory_budget=1, capture=Fake())
    acc.observe(q, k, None, None)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / np.sqrt(8), -1).numpy()
    pos = acc._positions.numpy()
    rr, cc = np.divmod(np.arange(35), 7)
    dist = np.maximum(np.abs(rr[pos][:, None] - rr[None]), np.abs(cc[pos][:, None] - cc[None]))  # (Q, N)
    for f, r in enumerate(acc.far_radii):
        want = (probs[:, :, pos] * (dist > r)).sum((0, 1, 2))
        np.testing.assert_allclose(acc.far_key_mass[f], want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(acc.far_rows[f], (dist > r).sum(0) * 2 * 3)
    assert acc.prompt_hp_ring[0].shape == (7,) and acc.prompt_hp_ring[0].sum() > 0


def _layer(maps, prompts=1, settings=None):
    """A LayerResult whose accumulators come from explicit (N, N) maps, one copy per prompt."""
    from attnprobe.report import LayerResult

    lam = highpass_numpy(maps, GRID, 0.1, 2)
    ring = rings_brute(maps, GRID, np.arange(N)).sum(0)
    hp = rings_brute(np.clip(lam, 0, None), GRID, np.arange(N)).sum(0)
    fkm, frows, _ = _far(maps)
    return LayerResult(
        name="x", label="x", grid=GRID, heads=1, level=0, joint=None, ring=ring[None, None] * prompts,
        hp_ring=hp[None, None] * prompts, mass=np.array([[maps.sum()]]) * prompts,
        hp_pos=np.array([[np.clip(lam, 0, None).sum()]]) * prompts, rows=np.array([float(N * prompts)]),
        key_mass=maps.sum(0) * prompts, probe_maps=np.zeros((0, N)), probe_rows=0,
        settings=settings or {"threshold": 0.8, "kernel_ratio": 0.6, "kmin": 3, "kmax": 31},
        far_key_mass=fkm * prompts, far_rows=frows * prompts, prompt_hp_ring=np.stack([hp] * prompts))


def test_report_bias_share_and_global_layers():
    mix = _layer(0.3 * PRIOR_UNIFORM[None] + 0.7 * _box(1))
    assert mix.bias_share == pytest.approx(0.3, abs=0.03) and not mix.is_global and mix.erf > 0
    uniform = _layer(np.full((N, N), 1 / N))
    assert uniform.is_global and uniform.erf == 0 and uniform.kernel_size == 31  # never the smallest kernel
    rng = np.random.default_rng(0)
    noisy = np.full((N, N), 1 / N) * (1 + 1e-6 * rng.standard_normal((N, N)))
    assert _layer(noisy / noisy.sum(1, keepdims=True)).is_global  # rounding noise is not locality
    assert uniform.bias_share == pytest.approx(1.0, abs=1e-6)


def test_erf_interval_and_margin():
    same = _layer(_box(2), prompts=4)
    lo, hi = same.erf_interval
    assert lo == hi == same.erf  # identical prompts: no spread
    varied = np.concatenate([_layer(_box(1)).prompt_hp_ring, _layer(_box(4)).prompt_hp_ring] * 3)
    lo, hi = bootstrap_erf(varied, 0.8)
    assert lo < hi
    curve = np.cumsum([0.5, 0.25, 0.2, 0.05])  # ASM 0.5, 0.75, 0.95, 1.0 → ERF 5 (K = 5 reaches 0.95)
    assert asm_margin(curve, 5, 0.8) == pytest.approx(min(0.95 - 0.8, 0.8 - 0.75))
    upper = _layer(_box(2), prompts=4).kernel_size_for(erf_from="upper")
    assert upper == _layer(_box(2), prompts=4).kernel_size_for(erf_from="point")  # no spread, same kernel


def test_key_mass_normalised_by_query_coverage_has_no_lattice_pattern():
    from attnprobe.stats import parse_queries

    pos = parse_queries("stride:2", GRID).numpy()
    maps = _box(1)[pos]  # a translation-invariant local layer seen through a strided lattice
    layer = _layer(_box(1))
    layer.ring = rings_brute(maps, GRID, pos).sum(0)[None, None]
    layer.key_mass = maps.sum(0)
    layer.settings = {**layer.settings, "queries": "stride:2"}
    inner = (ROWS > 1) & (ROWS < GRID[0] - 2) & (COLS > 1) & (COLS < GRID[1] - 2)
    raw = layer.key_mass[inner]
    assert raw.max() / raw.min() > 3  # the checkerboard: 1, 2 or 4 lattice queries within reach
    ratio = layer.key_mass_ratio[inner]
    # the coverage model knows rings, not each query's own profile: a sharp box(1) leaves a ±15% residual
    # (border queries concentrate more mass), against the ×4 lattice pattern of the raw key mass
    assert ratio.max() / ratio.min() < 1.3 and abs(ratio.mean() - 1) < 0.1
    assert layer.sink_keys == []
    sink = maps.copy()
    sink[:, 7 * 16 + 9] += 0.5  # every query also puts 0.5 on one key
    layer.key_mass = sink.sum(0)
    assert layer.sink_keys == [7 * 16 + 9]
