"""Teacher trajectories: what the student will meet at sampling time, recorded once, replayed in training.

The ``trajectory`` recipe (``deltadistill train --recipe trajectory``, the toolkit's default)
trains on the states the teacher itself visits when it samples, instead of on noised data:

1. **Record.** The frozen teacher samples every prompt × seed with the pipeline's own scheduler and
   guidance. Hooks keep, for every denoiser call, its keyword arguments (latents z_t, timestep,
   text condition; classifier-free guidance batches [uncond, cond] — [cond, uncond] for DiT,
   ``cond_first`` — are kept as 2 samples whose ``pair`` points at each other) and its output, and for every converted self-attention site the
   module's input x and output y ([M, N, C], stored in fp16).
2. **Regress** (``regress_steps``): every ΔConvBlock learns its teacher's map x → y directly, all
   layers at once but independently (teacher forcing: layer l sees the teacher's x_l, not what
   earlier students made of it): L = Σ_l mean (block_l(x_l) − y_l)², gradients clipped per block;
   with ``regress_cfg_loss`` the batch is drawn as CFG pairs and each layer adds that weight ×
   the MSE of its guided output u + w·(c − u).
3. **Fine-tune** (``steps``): the whole student on recorded states, L = ‖s(z_t) − f(z_t)‖² plus
   ``cfg_loss`` · ‖guided s − guided f‖² with guided = u + w·(c − u) over each CFG pair, so that
   the errors the sampler amplifies (the guided difference) are the ones trained away. Both terms
   compare what the sampler uses: the ε half of a learned-σ output (:func:`sampler_output`).

Memory: M = prompts × seeds × steps × 2 samples, each holding 2 · layers · N · C fp16 values besides the
call's inputs and output (the demo: 14 × 4 × 20 × 2 = 2240 samples, 3.4 GiB, of which 0.07 GiB inputs and
outputs); ``keep_every`` keeps every k-th call only. Text positions that every recorded row masks out are
dropped (:meth:`~attnprobe.core.family.Family.trim_text`; the demo's captions use 7 of T5's 300).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Trajectories", "TrajectoryMemoryError", "cfg_pairs", "check_memory", "guided", "join_states",
           "record_trajectories", "regression_loss", "replay", "sampler_output"]


@dataclass
class Trajectories:
    """Recorded teacher calls (M samples). ``kwargs``: batched tensors [M, ...] and constants."""

    batched: dict  # name → tensor [M, ...] (nested dicts flattened as "a.b")
    constant: dict  # name → value used for every call (None, flags, ...)
    out: torch.Tensor  # teacher output [M, ...], fp32
    pair: torch.Tensor  # [M] index of the CFG partner (itself without guidance)
    x: list[torch.Tensor] = field(default_factory=list)  # per site [M, N, C] inputs (fp16)
    y: list[torch.Tensor] = field(default_factory=list)  # per site [M, N, C] outputs (fp16)
    grids: list[tuple[int, int]] = field(default_factory=list)  # per site token grid
    guidance: float = 1.0
    cond_first: bool = False  # CFG batches were [cond; uncond] (DiT), not [uncond; cond]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.out.shape[0])

    def call_kwargs(self, idx: torch.Tensor, device=None, dtype=None) -> dict:
        """Keyword arguments of one denoiser call on samples ``idx`` (floating tensors cast to ``dtype``)."""
        kw: dict = {}
        for name, value in self.batched.items():
            v = value[idx].to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            _put(kw, name, v)
        for name, value in self.constant.items():
            _put(kw, name, value)
        return kw


def join_states(first: Trajectories, second: Trajectories) -> Trajectories:
    """The denoiser calls of both recordings (``first``'s states keep their indices), without layer tensors: the
    data of an end-to-end fine-tune. Both must come from the same pipeline and sampling settings."""
    if (set(first.batched) != set(second.batched) or set(first.constant) != set(second.constant)
            or first.guidance != second.guidance or first.cond_first != second.cond_first):
        raise ValueError("join_states: the two recordings come from different calls (arguments, guidance or CFG order)")
    n = len(first)
    info = {"prompts": first.info.get("prompts"), "states": n + len(second),
            "seeds": first.info.get("seeds", 0) + second.info.get("seeds", 0), "layer_bytes": 0}
    return Trajectories(batched={k: _cat_padded([first.batched[k], second.batched[k]]) for k in first.batched},
                        constant=dict(first.constant), out=torch.cat([first.out, second.out]),
                        pair=torch.cat([first.pair, second.pair + n]), guidance=first.guidance,
                        cond_first=first.cond_first, info=info)


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0 of tensors that may differ in their other sizes (text trimmed per call by
    ``Family.trim_text``): zeros fill the rest, and a zero mask entry marks a masked position."""
    size = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    if all(list(t.shape[1:]) == size for t in tensors):
        return torch.cat(tensors)
    if any(t.ndim != len(size) + 1 or list(t.shape[2:]) != size[1:] for t in tensors):
        raise ValueError(f"recorded tensors differ in more than their length: {[tuple(t.shape) for t in tensors]}")
    out = tensors[0].new_zeros([sum(t.shape[0] for t in tensors), *size])
    m = 0
    for t in tensors:
        out[(slice(m, m + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        m += t.shape[0]
    return out


def _put(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _flatten(prefix: str, value, batch: int, batched: dict, constant: dict, copy: bool = True) -> None:
    """Split call keywords into per-sample tensors (``batched``, dotted keys) and the rest (``constant``).

    ``copy=False`` keeps the tensors where they are (``kept_input_bytes`` sizes meta tensors with it)."""
    if isinstance(value, dict):
        if not value:
            constant[prefix] = {}
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, batch, batched, constant, copy)
    elif torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == batch:
        batched[prefix] = value.detach().to("cpu", copy=True) if copy else value
    elif torch.is_tensor(value) and value.numel() == 1:  # a scalar timestep: one per sample
        scalar = value.detach().reshape(1).expand(batch)
        batched[prefix] = scalar.to("cpu", copy=True) if copy else scalar
    else:
        constant[prefix] = value


def kept_input_bytes(kwargs: dict, batch: int) -> int:
    """Bytes a recording keeps of one denoiser call's keyword arguments (``batch`` samples)."""
    batched: dict = {}
    _flatten("", {k: v for k, v in kwargs.items() if k != "return_dict"}, batch, batched, {}, copy=False)
    return sum(v.numel() * v.element_size() for v in batched.values())


@torch.no_grad()
def record_trajectories(pipe, prompts: list[str], seeds: list[int], *, steps: int, resolution: int,
                        guidance: float | None = None, sites=(), keep_every: int = 1, batch_size: int = 28,
                        layer_dtype=torch.float16, log: Callable[[str], None] | None = None,
                        budget: int | None = None) -> Trajectories:
    """Sample every (prompt, seed) with ``pipe`` and record its denoiser calls (see the module doc).

    ``sites``: the :class:`~attnprobe.core.sites.AttnSite` list whose inputs/outputs to keep.
    ``budget``: bytes the recording may take (default: 80 % of the memory available now); the
    projection from the first denoiser call is checked before anything more is sampled.
    """
    from attnprobe.core.family import denoiser_of, family_of
    from attnprobe.core.pipeline import sample

    den = denoiser_of(pipe)
    family = family_of(den)
    signature = inspect.signature(den.forward)
    pairs = [(p, s) for p in prompts for s in seeds]
    parts: dict = {"batched": [], "out": [], "pair": [], "x": [[] for _ in sites], "y": [[] for _ in sites]}
    constant: dict = {}
    grids: list = [None] * len(sites)
    state = {"call": 0, "m": 0, "base": None, "io": [None] * len(sites)}

    def pre(module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        state["kwargs"] = dict(bound)
        state["base"] = family.grid_from_call(module, args, kwargs)

    def post(module, args, kwargs, output):
        keep = state["call"] % keep_every == 0
        state["call"] += 1
        if not keep:
            return
        kw = state.pop("kwargs")
        sample0 = kw.get("hidden_states", kw.get("sample"))
        b = int(sample0.shape[0])
        batched: dict = {}
        _flatten("", {k: v for k, v in kw.items() if k != "return_dict"}, b, batched, constant)
        nbytes = kept_input_bytes(batched, b)  # before trimming: later calls' captions may use more positions
        family.trim_text(batched)
        parts["batched"].append(batched)
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        parts["out"].append(out.detach().float().cpu())
        m, half = state["m"], b // 2
        cfg = b == 2 * state["prompts"]
        pair = torch.cat([torch.arange(half, b), torch.arange(0, half)]) if cfg else torch.arange(b)
        parts["pair"].append(pair + m)
        state["m"] += b
        nbytes += out.numel() * 4  # what is kept
        for i, io in enumerate(state["io"]):
            x, y = io
            parts["x"][i].append(x.to(layer_dtype).cpu())
            parts["y"][i].append(y.to(layer_dtype).cpu())
            nbytes += 2 * x.numel() * parts["x"][i][-1].element_size()
            if grids[i] is None and state["base"] is not None:
                from attnprobe.core.sites import halve_grid

                grids[i] = halve_grid(state["base"], sites[i].level)
        if state["call"] == 1:
            check_memory(nbytes, math.ceil(steps / keep_every) * math.ceil(len(pairs) / batch_size), budget)

    def site_hook(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            state["io"][i] = (x.detach(), y.detach())
        return hook

    handles = [den.register_forward_pre_hook(pre, with_kwargs=True), den.register_forward_hook(post, with_kwargs=True)]
    handles += [s.module.register_forward_hook(site_hook(i), with_kwargs=True) for i, s in enumerate(sites)]
    t0 = time.perf_counter()
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            state["prompts"] = len(chunk)
            sample(pipe, [p for p, _ in chunk], [s for _, s in chunk], steps=steps, resolution=resolution,
                   guidance=guidance, output_type="latent" if family.returns_latents else "pil")
            if log:
                log(f"trajectories: {min(start + batch_size, len(pairs))}/{len(pairs)} samples, "
                    f"{state['m']} states ({time.perf_counter() - t0:.0f}s)")
    finally:
        for h in handles:
            h.remove()
    keys = parts["batched"][0].keys()
    traj = Trajectories(
        batched={k: _cat_padded([b[k] for b in parts["batched"]]) for k in keys}, constant=constant,
        out=torch.cat(parts["out"]), pair=torch.cat(parts["pair"]),
        x=[torch.cat(v) for v in parts["x"]], y=[torch.cat(v) for v in parts["y"]], grids=grids,
        guidance=float(guidance if guidance is not None else default_guidance(pipe)),
        cond_first=bool(family.cfg_cond_first),
    )
    traj.info = {"prompts": len(prompts), "seeds": len(seeds), "steps": int(steps), "states": len(traj),
                 "keep_every": int(keep_every), "seconds": round(time.perf_counter() - t0, 1),
                 "layer_bytes": int(sum(t.numel() * t.element_size() for t in traj.x + traj.y))}
    return traj


class TrajectoryMemoryError(RuntimeError):
    """The recorded states would not fit in memory (the message says what to change)."""


def check_memory(bytes_per_call: int, calls: int, budget: int | None = None) -> None:
    """Refuse a recording of ``calls`` denoiser calls of ``bytes_per_call`` each beyond ``budget``."""
    from attnprobe.core.registry import _available_memory

    if budget is None:
        budget = int(0.8 * _available_memory())
    need = bytes_per_call * calls
    if budget > 0 and need > budget:
        raise TrajectoryMemoryError(
            f"the trajectory recipe would keep {need / 2**30:.1f} GiB of recorded states "
            f"({calls} denoiser calls × {bytes_per_call / 2**20:.0f} MiB) but {budget / 2**30:.1f} GiB is available; "
            "lower --traj-seeds or --traj-steps, raise --traj-keep-every, or use --recipe noised (streams its data)")


def default_guidance(pipe) -> float:
    """The guidance scale the pipeline used: its recorded ``_guidance_scale`` or its call's default."""
    value = getattr(pipe, "_guidance_scale", None)
    if value is None:
        param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
        value = param.default if param is not None and param.default is not inspect.Parameter.empty else 1.0
    return float(value)


def dihedral(t: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry ``k`` (0 … 7) of the square applied to the grid dims of channels-last ``t`` [B, H, W, C]:
    ``k % 4`` quarter turns, then a left-right flip when ``k ≥ 4``. On a non-square grid only the
    even ``k`` (identity, half turn, the two flips) keep the shape; an odd ``k`` raises."""
    if k % 2 and t.shape[1] != t.shape[2]:
        raise ValueError(f"symmetry {k} turns a {t.shape[1]}×{t.shape[2]} grid by a quarter; use an even one")
    t = torch.rot90(t, k % 4, dims=(1, 2))
    return t.flip(2) if k >= 4 else t


def regression_loss(blocks: list, traj: Trajectories, idx: torch.Tensor, device=None,
                    symmetry: int = 0, cfg_weight: float = 0.0) -> tuple[torch.Tensor, list[float]]:
    """Σ_l mean (block_l(x_l) − y_l)² on samples ``idx`` (teacher forcing); returns (total, per-layer values).

    ``symmetry`` k moves every input and target grid by :func:`dihedral` first. Self-attention is
    equivariant to any permutation of its tokens, so (g·x, g·y) is exactly what the teacher's layer
    computes on g·x: a flipped or turned state is a new, exact training pair for the block.

    ``cfg_weight`` > 0 takes ``idx`` as CFG pairs [cond rows; uncond rows] (:func:`cfg_pairs`) and adds,
    per layer, ``cfg_weight`` · mean (guided block outputs − guided teacher outputs)², guided =
    u + w·(c − u) with the recorded guidance w: the layer's share of the difference the sampler
    multiplies by w.
    """
    total, parts = 0.0, []
    for block, x, y, grid in zip(blocks, traj.x, traj.y, traj.grids):
        xb = x[idx].to(device=device, dtype=torch.float32)
        yb = y[idx].to(device=device, dtype=torch.float32)
        b, n, c = xb.shape
        xg, yg = xb.reshape(b, grid[0], grid[1], c), yb.reshape(b, grid[0], grid[1], c)
        if symmetry:
            xg, yg = dihedral(xg, symmetry), dihedral(yg, symmetry)
        diff = block(xg.contiguous()) - yg
        loss = diff.square().mean()
        if cfg_weight > 0:  # guided() is linear: guided(pred) − guided(y) = guided(pred − y)
            h = b // 2
            loss = loss + cfg_weight * guided(diff[:h], diff[h:], traj.guidance).square().mean()
        parts.append(float(loss.detach()))
        total = total + loss
    return total, parts


def replay(denoiser, traj: Trajectories, idx: torch.Tensor, *, device=None, dtype=None) -> torch.Tensor:
    """The denoiser's output on the recorded states ``idx`` (same call as the teacher's), [b, ...]."""
    kw = traj.call_kwargs(idx, device=device, dtype=dtype)
    kw["return_dict"] = False
    out = denoiser(**kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def guided(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided prediction u + w·(c − u) from the conditional rows ``cond`` and their unconditional partners."""
    return uncond + guidance * (cond - uncond)


def cfg_pairs(traj: Trajectories, idx: torch.Tensor) -> torch.Tensor:
    """The CFG pairs of the states ``idx`` as [their cond rows; their uncond rows], whichever half each state
    is: then ``guided(out[:b], out[b:], w)`` is the sampler's u + w·(c − u). A state recorded without
    guidance is its own partner (both halves)."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    partner = traj.pair[idx]
    first = partner > idx  # the state is in the first half of its recorded batch
    uncond = torch.where(first != bool(traj.cond_first), idx, partner)
    return torch.cat([traj.pair[uncond], uncond])


def sampler_output(out: torch.Tensor, channels: int | None) -> torch.Tensor:
    """The part of a denoiser output the sampler uses: the ε half of a learned-σ image output [B, 2C, h, w] for
    C = ``channels`` latent channels (PixArt, DiT, Hunyuan), else the whole output (UNets, SD3, and FLUX's packed
    tokens [B, N, C], whose dim 1 is tokens)."""
    if channels and out.ndim == 4 and out.shape[1] == 2 * channels:
        return out[:, :channels]
    return out
