"""``analyze(pipe, prompts)``: generate with capture on, return an ERF :class:`~attnprobe.report.Report`."""
from __future__ import annotations

import datetime as _dt
import platform
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from attnprobe._version import __version__
from attnprobe.capture import Capture
from attnprobe.config import AnalysisConfig
from attnprobe.core.family import denoiser_of, family_of
from attnprobe.core.family import vae_scale_factor
from attnprobe.core.pipeline import generate_one, resolve_resolution
from attnprobe.core.registry import config_hash
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


def analyze(
    pipe,
    prompts: list[str],
    config: AnalysisConfig | None = None,
    *,
    model_info: dict | None = None,
    image_dir: str | Path | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    **settings,
) -> Report:
    """Generate one image per prompt (seed + i) while capturing every self-attention layer.

    Settings come from ``config`` (an :class:`AnalysisConfig`) and/or keyword arguments of the
    same names (``steps=8``, ``queries="all"``, ...), validated before anything runs. Returns a
    :class:`Report`; ``report.save("erf.json")`` writes it. ``on_step(prompt_index, step, steps)``
    is called after each denoising step (progress bars). Images are written to ``image_dir``.
    Raises :class:`~attnprobe.capture.CaptureMissedError` if a selected layer was never called.
    """
    cfg = (config or AnalysisConfig()).with_(**settings).validate()
    if not prompts:
        raise ValueError("no prompts to analyse")
    denoiser = denoiser_of(pipe)
    family = family_of(denoiser)
    height, width = resolve_resolution(pipe, cfg.resolution)
    buckets = max(1, min(cfg.timestep_buckets, cfg.steps))
    cap = Capture(
        denoiser, layers=cfg.layers, queries=cfg.queries, cutoff=cfg.cutoff, order=cfg.order,
        highpass_mass=cfg.highpass_mass, timestep_buckets=buckets, steps=cfg.steps, probe_points=cfg.points,
        memory_budget_mb=cfg.memory_budget_mb, ring_backend=cfg.ring_backend, border=cfg.border,
        aggregate=cfg.aggregate, groups=min(MEAN_MAP_GROUPS, len(prompts)),
    )
    check_mean_map_memory(pipe, cfg, height, width)
    notes = resolution_notes(pipe, height, width)
    for note in notes:
        warnings.warn(note, ResolutionWarning, stacklevel=2)
    images: list[str] = []
    t0 = time.perf_counter()
    state = {"prompt": 0}
    step_hook = None
    if on_step is not None:
        step_hook = denoiser.register_forward_hook(lambda module, args, output: on_step(state["prompt"], cap.step, cfg.steps))
    try:
        with cap:
            for i, prompt in enumerate(prompts):
                state["prompt"] = i
                cap.new_generation(i)
                image = generate_one(pipe, prompt, height=height, width=width, steps=cfg.steps,
                                     guidance_scale=cfg.guidance_scale, seed=cfg.seed + i)
                if image_dir is not None:
                    Path(image_dir).mkdir(parents=True, exist_ok=True)
                    name = f"{i:03d}_{_slug(prompt)}.png"
                    image.save(Path(image_dir) / name)
                    images.append(name)
    finally:
        if step_hook is not None:
            step_hook.remove()
    cap.check_observed()
    settings_out = {
        **cfg.settings(),
        "resolution": [height, width],
        "timestep_buckets": buckets,
        "seeds": [cfg.seed + i for i in range(len(prompts))],
        "prompts": list(prompts),
        "prompts_hash": prompts_hash(list(prompts)),
        "n_prompts": len(prompts),
        "dtype": str(denoiser.dtype).replace("torch.", ""),
    }
    layers_out = [
        LayerResult(
            name=acc.site.name, label=acc.site.label, grid=acc.grid, heads=acc.heads, level=acc.site.level,
            joint=acc.site.joint, ring=acc.ring, hp_ring=acc.hp_ring, mass=acc.mass, hp_pos=acc.hp_pos,
            rows=acc.rows, key_mass=acc.key_mass, probe_maps=acc.probe_maps, probe_rows=acc.probe_rows,
            settings=settings_out, far_key_mass=acc.far_key_mass, far_rows=acc.far_rows,
            prompt_hp_ring=np.stack([acc.prompt_hp_ring.get(i, np.zeros(max(acc.grid))) for i in range(len(prompts))]),
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
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 3),
        "warnings": notes,
    }
    return Report(model=model, settings=settings_out, run=run, layers=layers_out, images=images)
