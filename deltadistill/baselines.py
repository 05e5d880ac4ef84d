"""Baselines a distilled student is compared with, each from the same noise as the teacher.

* :func:`zeroed_self_attention` — the teacher with every self-attention output replaced by zeros:
  what the model does without the layers being distilled;
* :func:`neighbourhood_attention` — training-free neighbourhood attention: every self-attention
  query attends only to the K×K keys around it (NATTEN's rule: the window is shifted inward at the
  borders so every query sees min(K, H)·min(K, W) keys), implemented as an additive mask passed to
  the module's own processor (the paper's Fig. 6 ablation with K = 13); one K for every layer, or
  one per layer (e.g. a report's recommended sizes), the layers not named keeping full attention;
* :func:`untrained_student` — the conversion of a distilled run before training (same kernel
  sizes, block settings, init and seed: :class:`deltadistill.trainer.Trainer` seeds torch with the
  run seed right before ``convert``, so this is exactly the student at step 0).
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch

from attnprobe.core.family import denoiser_of, family_of, find_self_attention
from attnprobe.core.sites import halve_grid

__all__ = ["zeroed_self_attention", "neighbourhood_attention", "neighbourhood_mask", "untrained_student"]


@contextmanager
def zeroed_self_attention(pipe):
    """Every self-attention module of ``pipe``'s denoiser outputs zeros (hooks removed on exit)."""
    den = denoiser_of(pipe)
    handles = []

    def hook(module, args, output):
        if isinstance(output, tuple):
            return tuple(torch.zeros_like(o) if torch.is_tensor(o) else o for o in output)
        return torch.zeros_like(output)  # [B, N, C]

    try:
        for site in find_self_attention(den):
            handles.append(den.get_submodule(site.name).register_forward_hook(hook))
        yield pipe
    finally:
        for h in handles:
            h.remove()


def _window_starts(n: int, k: int) -> torch.Tensor:
    """First index of each position's window of k along a side of n (shifted inward at borders)."""
    k = min(k, n)
    return (torch.arange(n) - k // 2).clamp(0, n - k)


def neighbourhood_mask(grid: tuple[int, int], kernel: int, dtype=torch.float32) -> torch.Tensor:
    """Additive mask [N, N]: 0 where key k is in query q's K×K neighbourhood, −inf elsewhere."""
    h, w = grid
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    r0, c0 = _window_starts(h, kernel)[rows], _window_starts(w, kernel)[cols]  # [N] window corners of each query
    kh, kw = min(kernel, h), min(kernel, w)
    inside = ((rows[None, :] >= r0[:, None]) & (rows[None, :] < r0[:, None] + kh)
              & (cols[None, :] >= c0[:, None]) & (cols[None, :] < c0[:, None] + kw))  # [N_q, N_k]
    return torch.zeros(h * w, h * w, dtype=dtype).masked_fill(~inside, float("-inf"))


@contextmanager
def neighbourhood_attention(pipe, kernel: int | Mapping[str, int] = 13):
    """Restrict self-attention of ``pipe`` to K×K neighbourhoods (hooks removed on exit).

    ``kernel`` is one K for every self-attention layer, or a mapping {layer name: K} (e.g. a
    report's recommended sizes): the layers it names get their own K, the others keep full
    attention. Every K must be a positive odd integer, and every name a self-attention layer.
    """
    den = denoiser_of(pipe)
    family = family_of(den)
    if not family.convertible:
        raise ValueError(f"{family.name}: neighbourhood attention is offered for self-attention-only families")
    sites = find_self_attention(den)
    if isinstance(kernel, Mapping):
        unknown = sorted(set(kernel) - {s.name for s in sites})
        if unknown:
            raise ValueError(f"neighbourhood attention: {unknown} are not self-attention layers of this model")
        kernels = dict(kernel)
    else:
        kernels = {s.name: kernel for s in sites}
    bad = {n: k for n, k in kernels.items() if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0}
    if bad:
        raise ValueError(f"neighbourhood attention: kernel sizes must be positive odd integers, got {bad}")
    state = {"base": None}
    cache: dict = {}

    def grid_hook(module, args, kwargs):
        state["base"] = family.grid_from_call(module, args, kwargs)

    def make(site, k):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]  # [B, N, C]
            grid = halve_grid(state["base"], site.level)
            key = (grid, k, x.dtype, x.device)
            if key not in cache:
                cache[key] = neighbourhood_mask(grid, k, x.dtype).to(x.device)
            kwargs = dict(kwargs, attention_mask=cache[key].expand(x.shape[0], -1, -1))  # [B, N, N]
            return args, kwargs
        return pre

    handles = [den.register_forward_pre_hook(grid_hook, with_kwargs=True)]
    try:
        for site in sites:
            if site.name in kernels:
                handles.append(site.module.register_forward_pre_hook(make(site, kernels[site.name]), with_kwargs=True))
        yield pipe
    finally:
        for h in handles:
            h.remove()


def untrained_student(base: str, config: dict, train_config: dict, device: str = "cpu"):
    """The converted base pipeline at step 0 of the run described by ``config``/``train_config``."""
    from attnprobe.core.registry import load_pipeline
    from deltadistill.conversion import convert

    pipe, _ = load_pipeline(base, device=device)
    layers = config["layers"]
    first = layers[0]
    torch.manual_seed(int(train_config.get("seed", 0)))
    if first.get("student") == "linear":
        return convert(pipe, None, layers=[layer["name"] for layer in layers], student="linear")
    convert(
        pipe,
        {layer["name"]: int(layer["kernel_size"]) for layer in layers},
        gate=first.get("gate", "scaled"),
        gate_scale=train_config.get("gate_scale") if first.get("gate", "scaled") == "scaled" else None,
        pool=first.get("pool", "ceil"),
        dw_bias=bool(first.get("dw_bias", True)),
        inter_ratio=first.get("inter_ratio", 0.5),
        scales=tuple(first.get("scales", (1, 0.5))),
        key_width=int(first.get("key_width", 0)),
        init=train_config.get("init", "mean_field"),
    )
    return pipe
