"""``analyze(pipe, prompts)``: generate with capture on, return an ERF :class:`~attnprobe.report.Report`."""
from __future__ import annotations

import datetime as _dt
import platform
import re
import time
import uuid
from pathlib import Path
from typing import Callable

import torch

from attnprobe._version import __version__
from attnprobe.capture import Capture
from attnprobe.config import AnalysisConfig
from attnprobe.core.family import denoiser_of, family_of
from attnprobe.core.pipeline import generate_one, resolve_resolution
from attnprobe.core.registry import config_hash
from attnprobe.report import LayerResult, Report, prompts_hash

__all__ = ["analyze"]


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
        memory_budget_mb=cfg.memory_budget_mb, ring_backend=cfg.ring_backend,
    )
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
                cap.new_generation()
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
            settings=settings_out,
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
    }
    return Report(model=model, settings=settings_out, run=run, layers=layers_out, images=images)
