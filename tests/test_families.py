"""Family adapters: discovery, and that each one computes exactly the q, k its processor uses.

The capture computes queries and keys itself through the family adapter (no global patch). These
tests intercept, *in the test only*, the attention function every processor really calls
(``F.scaled_dot_product_attention``, or FLUX's ``dispatch_attention_fn``) and check that

* the adapter's q and k are the processor's own, call by call, for every tiny family;
* the capture's accumulators equal ring masses computed from explicit N×N softmax maps of the
  processor's own q and k (brute force, float64);
* the capture sees a layer whose processor calls no SDPA at all, and a layer that is never
  called is reported by name.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnprobe.capture import CaptureMissedError, LayerAccumulator, capture
from attnprobe.core.family import families, family_of, find_self_attention
from attnprobe.core.pipeline import generate_one
from attnprobe.core.registry import aliases
from brute import rings_brute as _rings_brute
from conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(alias):
    return "cat" if alias == "tiny-dit" else "a photo of cat"


def _size(alias):
    return (32, 32) if alias == "tiny-dit" else (32, 48)


def _run(pipe, alias):
    h, w = _size(alias)
    return generate_one(pipe, _prompt(alias), height=h, width=w, steps=2, seed=1, output_type="np")


@contextlib.contextmanager
def real_attention_inputs(pipe, monkeypatch):
    """Record, per self-attention call, the (q, k) [B, heads, N, d] its processor hands to attention."""
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    sites = find_self_attention(den)
    state = {"site": None, "taken": False}
    seen: dict[str, list] = {s.name: [] for s in sites}

    def take(q, k, layout_bnhd: bool):
        if state["site"] is not None and not state["taken"]:
            state["taken"] = True
            if layout_bnhd:  # dispatch_attention_fn: [B, N, heads, d]
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            seen[state["site"]].append((q.detach().double(), k.detach().double()))

    sdpa = F.scaled_dot_product_attention

    def sdpa_rec(query, key, *args, **kwargs):
        take(query, key, False)
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_rec)
    import diffusers.models.transformers.transformer_flux as flux_mod

    dispatch = flux_mod.dispatch_attention_fn

    def dispatch_rec(query, key, *args, **kwargs):
        take(query, key, True)
        return dispatch(query, key, *args, **kwargs)

    monkeypatch.setattr(flux_mod, "dispatch_attention_fn", dispatch_rec)
    handles = []
    for s in sites:
        handles.append(s.module.register_forward_pre_hook(lambda m, a, name=s.name: state.update(site=name, taken=False)))
        handles.append(s.module.register_forward_hook(lambda m, a, o: state.update(site=None)))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("alias", TINY)
def test_adapter_qk_are_the_processors_own_and_stats_match_brute_force(alias, tiny_pipes, monkeypatch):
    pipe = tiny_pipes(alias)
    observed: dict[str, list] = {}
    original_observe = LayerAccumulator.observe

    def observe(self, q, k, mask, scale):
        observed.setdefault(self.site.name, []).append((q.detach().double(), k.detach().double()))
        return original_observe(self, q, k, mask, scale)

    monkeypatch.setattr(LayerAccumulator, "observe", observe)
    with real_attention_inputs(pipe, monkeypatch) as real:
        with capture(pipe, queries="all", timestep_buckets=1, steps=2) as cap:
            _run(pipe, alias)
    for name, acc in cap.layers.items():
        assert len(observed[name]) == len(real[name]) > 0, name
        ring = np.zeros_like(acc.ring[0])
        n = acc.grid[0] * acc.grid[1]
        for (q_obs, k_obs), (q, k) in zip(observed[name], real[name]):
            torch.testing.assert_close(q_obs, q, atol=1e-6, rtol=1e-5, msg=f"{alias} {name}: q")
            torch.testing.assert_close(k_obs, k, atol=1e-6, rtol=1e-5, msg=f"{alias} {name}: k")
            off = {None: 0, "image_first": 0, "image_last": k.shape[2] - n}[acc.site.joint]
            probs = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(q.shape[-1]), -1).numpy()  # (B, h, Nq, Nk)
            img = probs[:, :, off : off + n, off : off + n]
            for b in range(img.shape[0]):
                for hd in range(img.shape[1]):
                    ring[hd] += _rings_brute(img[b, hd], acc.grid, np.arange(n)).sum(0)
        np.testing.assert_allclose(acc.ring[0], ring, rtol=1e-4, atol=1e-6, err_msg=f"{alias} {name}")


def test_capture_does_not_depend_on_the_attention_function(tiny_pipes):
    """A processor that never calls SDPA (diffusers' classic AttnProcessor) is captured the same."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = tiny_pipes("tiny-pixart")
    sites = find_self_attention(pipe.transformer)
    stats = {}
    try:
        for proc in (AttnProcessor2_0, AttnProcessor):
            for s in sites:
                s.module.set_processor(proc())
            with capture(pipe, queries="all") as cap:
                _run(pipe, "tiny-pixart")
            stats[proc.__name__] = {n: a.ring.copy() for n, a in cap.layers.items()}
    finally:
        for s in sites:
            s.module.set_processor(AttnProcessor2_0())
    for name in stats["AttnProcessor"]:
        assert stats["AttnProcessor"][name].sum() > 0, name
        np.testing.assert_allclose(stats["AttnProcessor"][name], stats["AttnProcessor2_0"][name], rtol=1e-4, atol=1e-6)


def test_a_layer_never_called_is_named(tiny_pipes, monkeypatch):
    from attnprobe import analyze

    pipe = tiny_pipes("tiny-pixart")
    block = pipe.transformer.transformer_blocks[2]
    monkeypatch.setattr(block, "forward", lambda hidden_states, *a, **k: hidden_states)  # the block is skipped
    with pytest.raises(CaptureMissedError, match=r"1 of 4 .*transformer_blocks\.2\.attn1"):
        analyze(pipe, ["a photo of cat"], steps=1)
    monkeypatch.undo()
    with capture(pipe) as cap:
        assert cap.unobserved() == [f"transformer_blocks.{i}.attn1" for i in range(4)]
        with pytest.raises(CaptureMissedError, match="4 of 4"):
            cap.check_observed()


def test_families_are_discovered_and_consistent():
    fams = families()
    names = [f.name for f in fams]
    assert len(names) == len(set(names))
    assert {"pixart", "unet", "sdxl", "dit", "flux", "sd3", "hunyuan"} <= set(names)
    for spec in aliases().values():
        fam = next(f for f in fams if f.name == spec.family)
        if spec.pipeline:
            assert spec.pipeline in fam.pipeline_classes, spec
    tiny = {a for f in fams for a in f.tiny_builders()}
    assert set(TINY) <= tiny


@pytest.mark.parametrize("alias", TINY)
def test_each_tiny_pipeline_belongs_to_its_family(alias, tiny_pipes):
    pipe = tiny_pipes(alias)
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    fam = family_of(den)
    assert fam.name == aliases()[alias].family
    assert type(pipe).__name__ in fam.pipeline_classes
    sites = find_self_attention(den)
    assert sites and all(s.family == fam.name for s in sites)
    assert len({s.name for s in sites}) == len(sites)
