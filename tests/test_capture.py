"""Capture processors: exact outputs, restoration, and accumulators against brute force."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnprobe.core.family import find_self_attention
from attnprobe.core.sites import AttnSite, UnsupportedModelError
from attnprobe.capture import CaptureProcessor, LayerAccumulator, capture, parse_queries
from attnprobe.core.pipeline import generate_one

from brute import highpass_numpy as _highpass_numpy
from brute import rings_brute as _rings_brute
from conftest import TINY


def _generate(pipe, alias, **kw):
    prompt = "cat" if alias == "tiny-dit" else "a photo of cat"
    res = dict(height=32, width=32) if alias == "tiny-dit" else dict(height=32, width=48)
    return np.asarray(generate_one(pipe, prompt, steps=2, seed=3, output_type="np", **res, **kw))


@pytest.mark.parametrize("alias", TINY)
def test_capture_returns_identical_outputs_and_restores(alias, tiny_pipes):
    pipe = tiny_pipes(alias)
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    sites = find_self_attention(den)
    before = [s.module.processor for s in sites]
    sdpa = F.scaled_dot_product_attention
    ref = _generate(pipe, alias)
    with capture(pipe, queries="all", timestep_buckets=2, steps=2) as cap:
        got = _generate(pipe, alias)
        assert all(isinstance(s.module.processor, CaptureProcessor) for s in sites)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert [s.module.processor for s in sites] == before
    assert F.scaled_dot_product_attention is sdpa
    for acc in cap.layers.values():
        assert acc.grid is not None and acc.rows.sum() > 0
        # ring masses partition the image-key mass of every observed row
        np.testing.assert_allclose(acc.ring.sum(-1), acc.mass, rtol=1e-6)
        per_row = acc.mass.sum() / (acc.rows.sum() * acc.heads)
        if acc.site.joint is None:
            assert per_row == pytest.approx(1.0, abs=1e-5)
        else:  # joint attention: text keys take part of the softmax mass
            assert 0.0 < per_row < 1.0


@pytest.mark.parametrize("alias", ["tiny-pixart", "tiny-sd15", "tiny-dit"])
def test_capture_takes_q_k_from_the_processors_own_projections(alias, tiny_pipes, monkeypatch):
    # plain processors' to_q/to_k outputs are caught, not recomputed: same sums, half the to_q calls
    import attnprobe.capture as capture_module

    pipe = tiny_pipes(alias)
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    calls = []
    hook = find_self_attention(den)[0].module.to_q.register_forward_hook(lambda *a: calls.append(1))
    sums = []
    try:
        for recompute in (False, True):
            if recompute:
                monkeypatch.setattr(capture_module, "run_catching_projections", lambda fam, attn, run: (run(), None))
            with capture(pipe, queries="all", steps=2) as cap:
                _generate(pipe, alias)
            sums.append({n: (a.ring, a.hp_ring, a.key_mass, a.far_key_mass) for n, a in cap.layers.items()})
            calls.append(None)  # separates the two runs
    finally:
        hook.remove()
    caught, recomputed = calls.index(None), len(calls) - calls.index(None) - 2
    assert caught > 0 and recomputed == 2 * caught
    for name, got in sums[0].items():
        for a, b in zip(got, sums[1][name]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_capture_restores_on_error(tiny_pipes):
    pipe = tiny_pipes("tiny-pixart")
    sites = find_self_attention(pipe.transformer)
    before = [s.module.processor for s in sites]
    sdpa = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="boom"):
        with capture(pipe):
            raise RuntimeError("boom")
    assert [s.module.processor for s in sites] == before
    assert F.scaled_dot_product_attention is sdpa


def test_capture_twice_raises(tiny_pipes):
    pipe = tiny_pipes("tiny-pixart")
    with capture(pipe):
        with pytest.raises(RuntimeError, match="already being captured"):
            with capture(pipe):
                pass


def test_unsupported_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="supported: .*PixArtTransformer2DModel"):
        capture(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_layer_filter(tiny_pipes):
    pipe = tiny_pipes("tiny-sd15")
    cap = capture(pipe, layers=r"^down")
    assert cap.layers and all(name.startswith("down") for name in cap.layers)
    with pytest.raises(ValueError, match="matches no"):
        capture(pipe, layers="nothing-like-this")


def test_parse_queries():
    assert parse_queries("all", (4, 6)).tolist() == list(range(24))
    # centred lattice: rows {0, 2, 3}, cols {0, 2, 3, 5} on 4×6 (both borders sampled)
    assert parse_queries("stride:2", (4, 6)).tolist() == [r * 6 + c for r in (0, 2, 3) for c in (0, 2, 3, 5)]
    for n, stride in [(16, 2), (32, 3), (64, 5), (17, 4), (9, 9), (64, 7)]:
        q = parse_queries(f"stride:{stride}", (n, n))
        rows = sorted(set((q // n).tolist()))
        assert rows[0] == 0 and rows[-1] == n - 1  # first and last row
        gaps = np.diff(rows)
        assert gaps.max() <= stride and gaps.min() >= stride - 1  # about S apart
        mirrored = sorted(n - 1 - r for r in rows)
        assert sum(a != b for a, b in zip(rows, mirrored)) <= 2  # symmetric up to the middle rounding
    s = parse_queries("sample:5", (4, 6))
    assert len(s) == 5 and len(set(s.tolist())) == 5 and s.tolist() == parse_queries("sample:5", (4, 6)).tolist()
    assert len(parse_queries("auto", (16, 16))) == 256  # small grids: every query
    assert parse_queries("auto", (32, 32)).tolist() == parse_queries("stride:3", (32, 32)).tolist()
    assert parse_queries("auto", (64, 64)).tolist() == parse_queries("stride:5", (64, 64)).tolist()
    for bad in ("stride:0", "sample:x", "every", "stride:-1"):
        with pytest.raises(ValueError):
            parse_queries(bad, (4, 4))


# -- brute force: the accumulators against explicit N×N maps ------------------------------------------


class _FakeCapture:
    def __init__(self, grid):
        self.grid = grid

    def base_grid(self):
        return self.grid

    def bucket(self):
        return 0


@pytest.mark.parametrize("joint,n_text", [(None, 0), ("image_last", 5), ("image_first", 7)])
@pytest.mark.parametrize("budget,border", [(1 << 30, "zero"), (1, "zero"), (1 << 30, "circular")])  # chunks × borders
def test_observe_matches_brute_force(joint, n_text, budget, border):
    grid = (5, 7)
    n = 35
    g = torch.Generator().manual_seed(7)
    b, heads, d = 2, 3, 8
    q = torch.randn(b, heads, n + n_text, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, heads, n + n_text, d, generator=g, dtype=torch.float64)
    site = AttnSite("x.attn", "x", "fake", joint=joint)
    acc = LayerAccumulator(
        site=site, buckets=1, highpass_mass="positive", cutoff=0.15, order=2, queries="stride:2",
        probe_points=[(0.5, 0.5)], memory_budget=budget, capture=_FakeCapture(grid), border=border,
        aggregate="mean-map" if budget > 1 else "per-map",  # mean-map sums need room; budget 1 forces 1-query chunks
    )
    acc.observe(q.float(), k.float(), None, None)
    off = n_text if joint == "image_last" else 0
    pos = parse_queries("stride:2", grid).numpy()
    probs = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(d), -1).numpy()  # (B, h, Nq, Nk)
    img = probs[:, :, off + pos][..., off : off + n]  # (B, h, Q, N)
    ring = np.zeros((heads, max(grid)))
    hp_ring = np.zeros_like(ring)
    for bi in range(b):
        for hi in range(heads):
            ring[hi] += _rings_brute(img[bi, hi], grid, pos).sum(0)
            lam = _highpass_numpy(img[bi, hi], grid, 0.15, 2, border=border)
            hp_ring[hi] += _rings_brute(np.clip(lam, 0, None), grid, pos).sum(0)
    if budget > 1:
        np.testing.assert_allclose(acc.map_sum[0, 0].numpy(), img.sum((0, 1)), rtol=1e-5, atol=1e-6)  # mean-map sums
    np.testing.assert_allclose(acc.ring[0], ring, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.hp_ring[0], hp_ring, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(acc.key_mass, img.sum((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.mass[0], img.sum((0, 2, 3)), rtol=1e-5)
    assert acc.rows[0] == b * len(pos)
    centre = 2 * 7 + 3  # probe (0.5, 0.5) on a 5×7 grid → row 2, col 3
    np.testing.assert_allclose(acc.probe_maps[0], probs[:, :, off + centre, off : off + n].mean(1).sum(0), rtol=1e-5, atol=1e-7)


def test_capture_on_real_layer_matches_manual_attention(tiny_pipes):
    """tiny PixArt: the accumulators of one layer equal a manual q/k recomputation from its input."""
    pipe = tiny_pipes("tiny-pixart")
    den = pipe.transformer
    attn = den.transformer_blocks[1].attn1
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with capture(pipe, layers="transformer_blocks.1.attn1", queries="all") as cap:
            _generate(pipe, "tiny-pixart")
    finally:
        handle.remove()
    acc = cap.layers["transformer_blocks.1.attn1"]
    grid = acc.grid
    ring = np.zeros_like(acc.ring[0])
    with torch.no_grad():
        for x in seen:
            bsz, n, _ = x.shape
            q = attn.to_q(x).view(bsz, n, attn.heads, -1).transpose(1, 2).double()
            k = attn.to_k(x).view(bsz, n, attn.heads, -1).transpose(1, 2).double()
            p = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), -1).numpy()
            for bi in range(bsz):
                for hi in range(attn.heads):
                    ring[hi] += _rings_brute(p[bi, hi], grid, np.arange(n)).sum(0)
    np.testing.assert_allclose(acc.ring.sum(0), ring, rtol=1e-4)
