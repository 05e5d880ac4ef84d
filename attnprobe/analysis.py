"""``analyze(pipe, prompts)``: generate with capture on, return an ERF :class:`~attnprobe.report.Report`."""
from __future__ import annotations

import datetime as _dt
import io
import platform
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from attnprobe._version import __version__
from attnprobe.capture import Capture
from attnprobe.config import AnalysisConfig
from attnprobe.core.family import denoiser_of, family_of
from attnprobe.core.family import vae_scale_factor
from attnprobe.core.pipeline import generate_one, resolve_resolution
from attnprobe.core.registry import config_hash
from attnprobe.distributed import Team
from attnprobe.report import LayerResult, Report, prompts_hash
from attnprobe.estimators import mean_map_rings

__all__ = ["analyze", "ResolutionWarning", "resolution_notes", "check_mean_map_memory", "MEAN_MAP_GROUPS"]

MEAN_MAP_GROUPS = 8  # --aggregate mean-map: prompt groups kept apart for the bootstrap interval


class ResolutionWarning(UserWarning):
    """The analysed resolution is not the one the model was made for."""


def resolution_notes(pipe, height: int, width: int) -> list[str]:
    """A warning line when (height, width) differs from the model's native or training resolution."""
    denoiser = denoiser_of(pipe)
    vf = vae_scale_factor(pipe)
    native = getattr(pipe, "_attnprobe_resolution", None) or family_of(denoiser).default_resolution(denoiser.config, vf)
    trained = getattr(pipe, "_attnprobe_training_resolution", None)
    out = []
    for what, size in (("native", native), ("training", trained)):
        if size and (height, width) != (int(size), int(size)):
            out.append(
                f"resolution {height}x{width} differs from the model's {what} resolution {int(size)}x{int(size)}: "
                "the token grid changes and ERFs measured here need not hold at the model's own size"
            )
            break
    return out


def check_mean_map_memory(pipe, cfg: AnalysisConfig, height: int, width: int) -> None:
    """Raise UserError before anything runs when ``--aggregate mean-map`` sums would not fit the budget."""
    if cfg.aggregate != "mean-map":
        return
    from attnprobe.core.errors import UserError
    from attnprobe.core.family import find_self_attention
    from attnprobe.core.sites import select_sites
    from attnprobe.stats import parse_queries

    den = denoiser_of(pipe)
    base = family_of(den).base_grid(den.config, vae_scale_factor(pipe), height, width)
    buckets = max(1, min(cfg.timestep_buckets, cfg.steps))
    budget = cfg.memory_budget_mb * 2**20
    for site in select_sites(find_self_attention(den), cfg.layers):
        h, w = site.grid(base)
        q = len(parse_queries(cfg.queries, (h, w)))
        need = buckets * q * h * w * 8
        if need > budget:
            raise UserError(
                f"{site.name}: --aggregate mean-map keeps {q} queries × {h * w} keys × {buckets} bucket(s) = "
                f"{need / 2**20:.1f} MiB per layer, over --memory-budget-mb {cfg.memory_budget_mb:g}; use fewer queries "
                "(--queries stride:S) or timestep buckets, or a larger budget"
            )


def _mean_map(acc, cfg: AnalysisConfig) -> dict | None:
    """The aggregated map's high-pass statistics (``--aggregate mean-map``) from the capture's map sums."""
    if acc.map_sum is None:
        return None
    mm = mean_map_rings(acc.map_sum, acc.grid, acc._positions, cutoff=cfg.cutoff, order=cfg.order, border=cfg.border,
                        highpass_mass=cfg.highpass_mass, threshold=cfg.threshold)
    mm["groups"] = int(acc.map_sum.shape[1])
    return mm


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def _all_prompts(shares: list) -> list[tuple[int, str]]:
    """(global index, prompt) of every rank's share, by index; ValueError for a mismatch or a repeat."""
    pairs: dict[int, str] = {}
    for rank, (indices, texts, *_) in enumerate(shares):
        where = f" on rank {rank}" if len(shares) > 1 else ""
        if len(indices) != len(texts):
            raise ValueError(f"prompt_indices has {len(indices)} entries for {len(texts)} prompts{where}")
        for i, text in zip(indices, texts):
            if i < 0 or i in pairs:
                raise ValueError(f"prompt index {i}{where} is {'negative' if i < 0 else 'given twice'}")
            pairs[i] = text
    if not pairs:
        raise ValueError("no prompts to analyse")
    return sorted(pairs.items())


def _fill_unseen(cap: Capture, team: Team) -> None:
    """Zero sums, shaped as other ranks saw them, for layers this rank never ran (it had no prompts)."""
    if team.world_size == 1:
        return
    seen = team.all_gather({name: (acc.heads, acc.grid) for name, acc in cap.layers.items() if acc.grid is not None})
    for name, acc in cap.layers.items():
        shape = next((s[name] for s in seen if name in s), None)
        if shape is not None:
            acc.allocate(*shape)


_SUMMED = ("ring", "hp_ring", "mass", "hp_pos", "rows", "key_mass", "far_key_mass", "far_rows", "probe_maps")


def _sum_over_ranks(cap: Capture, team: Team, indices: list[int]) -> None:
    """Replace every layer's sums by their sums over ranks (per-prompt rows: full (P, R), zeros where not taken)."""
    if team.world_size == 1:
        return
    for acc in cap.layers.values():
        per_prompt = np.stack([acc.prompt_hp_ring.get(i, np.zeros(max(acc.grid))) for i in indices])  # (P, R)
        parts = [getattr(acc, key) for key in _SUMMED] + [per_prompt, np.array([acc.probe_rows])]
        if acc.map_sum is not None:
            parts.append(acc.map_sum.numpy())  # (T, G, Q, N)
        summed = team.sum(parts)
        for key, value in zip(_SUMMED, summed):
            setattr(acc, key, value)
        acc.prompt_hp_ring = dict(zip(indices, summed[len(_SUMMED)]))
        acc.probe_rows = int(round(summed[len(_SUMMED) + 1][0]))
        if acc.map_sum is not None:
            acc.map_sum = torch.from_numpy(summed[-1])


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def analyze(
    pipe,
    prompts: list[str],
    config: AnalysisConfig | None = None,
    *,
    model_info: dict | None = None,
    image_dir: str | Path | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    prompt_indices: Sequence[int] | None = None,
    team: Team | None = None,
    **settings,
) -> Report:
    """Generate one image per prompt (prompt i: seed + i) while capturing every self-attention layer.

    Settings come from ``config`` (an :class:`AnalysisConfig`) and/or keyword arguments of the
    same names (``steps=8``, ``queries="all"``, ...), validated before anything runs. Returns a
    :class:`Report`; ``report.save("erf.json")`` writes it. ``on_step(position, step, steps)``
    is called after each denoising step (progress bars). Images are written to ``image_dir``.
    Raises :class:`~attnprobe.capture.CaptureMissedError` if a selected layer was never called.

    ``prompt_indices``: the global index i of each prompt (default 0, 1, ...), which sets its seed
    and image name, so a shard of a prompt list gives the numbers the whole list gives for it.
    ``team`` (:func:`attnprobe.distributed.launch`): this process is one rank of several; each passes
    its share, the sums are added over ranks, and every rank returns the report of all prompts (as
    one process would write it); rank 0's ``image_dir`` receives every rank's images.
    """
    cfg = (config or AnalysisConfig()).with_(**settings).validate()
    team = team or Team()
    indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
    denoiser = denoiser_of(pipe)
    family = family_of(denoiser)
    shares = team.all_gather((indices, list(prompts), image_dir is not None, str(denoiser.device)))
    want_images = shares[0][2]  # rank 0 decides; other ranks send their images to it
    images_out: list[tuple[str, bytes]] = []
    t0 = time.perf_counter()
    state = {"prompt": 0}
    step_hook = None
    with team.together():
        pairs = _all_prompts(shares)
        height, width = resolve_resolution(pipe, cfg.resolution)
        buckets = max(1, min(cfg.timestep_buckets, cfg.steps))
        cap = Capture(
            denoiser, layers=cfg.layers, queries=cfg.queries, cutoff=cfg.cutoff, order=cfg.order,
            highpass_mass=cfg.highpass_mass, timestep_buckets=buckets, steps=cfg.steps, probe_points=cfg.points,
            memory_budget_mb=cfg.memory_budget_mb, ring_backend=cfg.ring_backend, border=cfg.border,
            aggregate=cfg.aggregate, groups=min(MEAN_MAP_GROUPS, len(pairs)),  # groups: global prompt index % groups
        )
        check_mean_map_memory(pipe, cfg, height, width)
        notes = resolution_notes(pipe, height, width)
        for note in notes if team.is_main else ():
            warnings.warn(note, ResolutionWarning, stacklevel=2)
        if on_step is not None:
            step_hook = denoiser.register_forward_hook(lambda module, args, output: on_step(state["prompt"], cap.step, cfg.steps))
        try:
            with cap:
                for j, (i, prompt) in enumerate(zip(indices, prompts)):
                    state["prompt"] = j
                    cap.new_generation(i)
                    image = generate_one(pipe, prompt, height=height, width=width, steps=cfg.steps,
                                         guidance_scale=cfg.guidance_scale, seed=cfg.seed + i)
                    name = f"{i:03d}_{_slug(prompt)}.png"
                    if want_images and team.is_main:
                        Path(image_dir).mkdir(parents=True, exist_ok=True)
                        image.save(Path(image_dir) / name)
                    elif want_images:
                        images_out.append((name, _png(image)))
        finally:
            if step_hook is not None:
                step_hook.remove()
    _fill_unseen(cap, team)
    with team.together():
        cap.check_observed()
    all_indices = [i for i, _ in pairs]
    _sum_over_ranks(cap, team, all_indices)
    received = team.gather(images_out) if team.world_size > 1 and want_images else None
    for name, data in (item for part in received or () for item in part):
        Path(image_dir).mkdir(parents=True, exist_ok=True)
        (Path(image_dir) / name).write_bytes(data)
    all_prompts = [p for _, p in pairs]
    images = [f"{i:03d}_{_slug(p)}.png" for i, p in pairs] if want_images else []
    settings_out = {
        **cfg.settings(),
        "resolution": [height, width],
        "timestep_buckets": buckets,
        "seeds": [cfg.seed + i for i in all_indices],
        "prompts": all_prompts,
        "prompts_hash": prompts_hash(all_prompts),
        "n_prompts": len(all_prompts),
        "dtype": str(denoiser.dtype).replace("torch.", ""),
    }
    layers_out = [
        LayerResult(
            name=acc.site.name, label=acc.site.label, grid=acc.grid, heads=acc.heads, level=acc.site.level,
            joint=acc.site.joint, ring=acc.ring, hp_ring=acc.hp_ring, mass=acc.mass, hp_pos=acc.hp_pos,
            rows=acc.rows, key_mass=acc.key_mass, probe_maps=acc.probe_maps, probe_rows=acc.probe_rows,
            settings=settings_out, far_key_mass=acc.far_key_mass, far_rows=acc.far_rows,
            prompt_hp_ring=np.stack([acc.prompt_hp_ring.get(i, np.zeros(max(acc.grid))) for i in all_indices]),
            mean_map=_mean_map(acc, cfg),
        )
        for acc in cap.layers.values()
    ]
    model = {
        "alias": None,
        "source": None,
        "pipeline": type(pipe).__name__,
        "denoiser": type(denoiser).__name__,
        "family": family.name,
        "config_hash": config_hash(denoiser.config),
    }
    model.update(model_info or {})
    import diffusers

    run = {
        "run_id": uuid.uuid4().hex,
        "attnprobe": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": str(denoiser.device),
        "world_size": team.world_size,  # processes that contributed; shards: the prompt indices each took
        "shards": [list(share[0]) for share in shares],
        "devices": [share[3] for share in shares],
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 3),
        "warnings": notes,
    }
    return Report(model=model, settings=settings_out, run=run, layers=layers_out, images=images)
