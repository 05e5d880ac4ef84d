"""--aggregate per-map|mean-map and --border circular|zero against brute-force references."""
import numpy as np
import pytest
import torch

from attnprobe.estimators import mean_map_rings
from attnprobe.stats import butterworth_highpass, effective_receptive_field, parse_queries, ring_mass
from brute import highpass_numpy, rings_brute

GRID = (9, 11)
N = GRID[0] * GRID[1]


def _random_maps(q, n, seed, heads=3):
    g = np.random.default_rng(seed)
    logits = 3.0 * g.standard_normal((heads, q, n))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("border", ["zero", "circular"])
def test_highpass_border_matches_numpy(border):
    maps = _random_maps(5, N, 0)
    got = butterworth_highpass(torch.from_numpy(maps), GRID, 0.12, 3, border=border).numpy()
    np.testing.assert_allclose(got, highpass_numpy(maps, GRID, 0.12, 3, border=border), atol=1e-12)


def test_circular_border_wraps_corner_mass_onto_far_rings():
    h, w = 16, 16
    corner = np.zeros((1, h * w))
    corner[0, 0] = 0.6
    corner[0, 1] = corner[0, w] = 0.2  # a corner query attending to itself and its two neighbours
    pos = np.array([0])
    far = {}
    for border in ("zero", "circular"):
        lam = butterworth_highpass(torch.from_numpy(corner), (h, w), 0.1, 2, border=border).numpy()
        rings = rings_brute(np.clip(lam, 0, None), (h, w), pos)[0]
        far[border] = rings[8:].sum() / rings.sum()
    # wrapping puts the corner's neighbours of the torus (the opposite edges, ring 15) in the map
    assert far["circular"] > 2 * far["zero"]


@pytest.mark.parametrize("border", ["zero", "circular"])
def test_mean_map_of_one_step_is_per_map_of_the_averaged_map(border):
    pos = parse_queries("stride:2", GRID).numpy()
    maps = _random_maps(len(pos), N, 1)  # (heads, Q, N): one step, one prompt
    map_sum = maps.sum(0)[None, None]  # (T=1, G=1, Q, N) as the capture keeps it
    got = mean_map_rings(map_sum, GRID, torch.from_numpy(pos), cutoff=0.1, order=2, border=border)
    mean = maps.mean(0)  # the averaged map, built explicitly
    ref = rings_brute(np.clip(highpass_numpy(mean, GRID, 0.1, 2, border=border), 0, None), GRID, pos).sum(0)
    np.testing.assert_allclose(got["rings"] / got["rings"].sum(), ref / ref.sum(), atol=1e-10)
    np.testing.assert_allclose(got["bucket_rings"][0], got["rings"], atol=1e-10)
    assert got["interval"] is None  # one group: no bootstrap


def test_mean_map_differs_from_per_map_where_maps_disagree():
    """Two steps whose maps are shifted ±2 from the query: each map is local (ERF ≤ 5 per map)
    while the averaged map is bimodal; per-map and mean-map must read them differently."""
    h, w = GRID
    pos = parse_queries("all", GRID)
    rr, cc = np.divmod(np.arange(N), w)
    steps = []
    for shift in (+3, -3):
        target = rr * w + np.clip(cc + shift, 0, w - 1)
        steps.append(np.eye(N)[target])
    def per_map(maps):
        return sum(ring_mass(butterworth_highpass(torch.from_numpy(a), GRID, border="zero").clamp(min=0), GRID, pos).sum(0)
                   for a in maps).numpy()

    both = per_map(steps)
    mean = mean_map_rings(np.stack(steps).sum(0)[None, None], GRID, pos, border="zero")["rings"]
    assert not np.allclose(both / both.sum(), mean / mean.sum(), atol=1e-3)
    same = mean_map_rings((2 * steps[0])[None, None], GRID, pos, border="zero")["rings"]  # identical maps: same reading
    solo = per_map(steps[:1])
    np.testing.assert_allclose(same / same.sum(), solo / solo.sum(), atol=1e-10)


def test_mean_map_bootstrap_over_groups():
    pos = parse_queries("all", GRID)
    rr, cc = np.divmod(np.arange(N), GRID[1])
    d = np.maximum(np.abs(rr[:, None] - rr[None]), np.abs(cc[:, None] - cc[None]))
    box = lambda r: (d <= r) / (d <= r).sum(1, keepdims=True)  # noqa: E731
    same = mean_map_rings(np.stack([box(1)] * 4)[None], GRID, pos, samples=200)
    erf = effective_receptive_field(np.cumsum(same["rings"]))
    assert same["interval"] == (erf, erf)
    mixed = mean_map_rings(np.stack([box(1), box(4)] * 3)[None], GRID, pos, samples=300)
    lo, hi = mixed["interval"]
    point = effective_receptive_field(np.cumsum(mixed["rings"]))
    assert lo < hi and lo <= point <= hi


def test_mean_map_analysis_round_trips_and_refuses_merge(tmp_path):
    from attnprobe import analyze, load_report, merge_reports
    from attnprobe.core.registry import load_pipeline
    from attnprobe.report import ReportError

    pipe, _ = load_pipeline("tiny-pixart")
    prompts = ["a photo of cat", "a red dog", "a cat"]
    rep = analyze(pipe, prompts, steps=2, aggregate="mean-map", border="zero", timestep_buckets=2)
    layer = rep.layers[0]
    assert layer.aggregate == "mean-map" and layer.mean_map["groups"] == 3
    assert layer.mean_map["bucket_rings"].shape == (2, max(layer.grid))
    assert rep.settings["aggregate"] == "mean-map" and rep.settings["border"] == "zero"
    rep.save(tmp_path / "erf.json")
    back = load_report(tmp_path / "erf.json")
    assert [(l.erf, l.erf_interval, l.kernel_size) for l in back.layers] == \
        [(l.erf, l.erf_interval, l.kernel_size) for l in rep.layers]
    other = analyze(pipe, ["a dog"], steps=2, aggregate="mean-map", seed=9, timestep_buckets=2)
    with pytest.raises(ReportError, match="mean-map"):
        merge_reports([rep, other])


@pytest.mark.parametrize("grid", [(6, 9), (16, 16)])
def test_dense_highpass_operator_is_the_fft_filter(grid):
    from attnprobe.stats import highpass_operator

    maps = torch.from_numpy(_random_maps(4, grid[0] * grid[1], 3).reshape(-1, grid[0] * grid[1]))
    op = highpass_operator(grid, 0.1, 2, "zero", dtype=torch.float64)
    np.testing.assert_allclose((maps @ op).numpy(), butterworth_highpass(maps, grid, 0.1, 2, border="zero").numpy(),
                               atol=1e-12)
