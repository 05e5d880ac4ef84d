"""``analyze(pipe, prompts)``: generate with capture on, return an ERF :class:`~attnprobe.report.Report`."""
from __future__ import annotations

import datetime as _dt
import platform
import re
import time
from pathlib import Path
from typing import Callable

import torch

from attnprobe._version import __version__
from attnprobe.arch import denoiser_of, detect_arch
from attnprobe.capture import Capture
from attnprobe.registry import config_hash
from attnprobe.report import LayerResult, Report, prompts_hash
from attnprobe.run import generate_one, resolve_resolution

DEFAULT_PROBE_POINTS = [(0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.5)]


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def analyze(
    pipe,
    prompts: list[str],
    *,
    resolution=None,
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    threshold: float = 0.8,
    cutoff: float = 0.1,
    order: int = 2,
    highpass_mass: str = "positive",
    kernel_ratio: float = 0.6,
    kmin: int = 3,
    kmax: int = 31,
    queries: str = "auto",
    layers: str | None = None,
    timestep_buckets: int = 4,
    probe_points: list[tuple[float, float]] | None = None,
    sink_factor: float = 5.0,
    memory_budget_mb: float = 256,
    ring_backend: str = "auto",
    model_info: dict | None = None,
    image_dir: str | Path | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> Report:
    """Generate one image per prompt (seed + i) while capturing every self-attention layer.

    Returns a :class:`Report`; ``report.save("erf.json")`` writes it. ``on_step(prompt_index,
    step, steps)`` is called after each denoising step (progress bars). Images are written to
    ``image_dir`` when given.
    """
    if not prompts:
        raise ValueError("no prompts to analyse")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    if steps < 1:
        raise ValueError("steps must be ≥ 1")
    if kmin > kmax:
        raise ValueError(f"kmin {kmin} > kmax {kmax}")
    denoiser = denoiser_of(pipe)
    arch = detect_arch(denoiser)
    height, width = resolve_resolution(pipe, resolution)
    probe_points = DEFAULT_PROBE_POINTS if probe_points is None else [tuple(map(float, p)) for p in probe_points]
    buckets = max(1, min(timestep_buckets, steps))
    cap = Capture(
        denoiser,
        layers=layers,
        queries=queries,
        cutoff=cutoff,
        order=order,
        highpass_mass=highpass_mass,
        timestep_buckets=buckets,
        steps=steps,
        probe_points=probe_points,
        memory_budget_mb=memory_budget_mb,
        ring_backend=ring_backend,
    )
    images: list[str] = []
    t0 = time.perf_counter()
    step_hook = None
    if on_step is not None:
        state = {"prompt": 0}

        def _after(module, args, output):
            on_step(state["prompt"], cap.step, steps)

        step_hook = denoiser.register_forward_hook(_after)
    try:
        with cap:
            for i, prompt in enumerate(prompts):
                if on_step is not None:
                    state["prompt"] = i
                cap.new_generation()
                image = generate_one(
                    pipe, prompt, height=height, width=width, steps=steps, guidance_scale=guidance_scale, seed=seed + i
                )
                if image_dir is not None:
                    Path(image_dir).mkdir(parents=True, exist_ok=True)
                    name = f"{i:03d}_{_slug(prompt)}.png"
                    image.save(Path(image_dir) / name)
                    images.append(name)
    finally:
        if step_hook is not None:
            step_hook.remove()
    settings = {
        "resolution": [height, width],
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "seeds": [seed + i for i in range(len(prompts))],
        "prompts": list(prompts),
        "prompts_hash": prompts_hash(list(prompts)),
        "n_prompts": len(prompts),
        "threshold": threshold,
        "cutoff": cutoff,
        "order": order,
        "highpass_mass": highpass_mass,
        "kernel_ratio": kernel_ratio,
        "kmin": kmin,
        "kmax": kmax,
        "queries": queries,
        "layers": layers,
        "timestep_buckets": buckets,
        "probe_points": [list(p) for p in probe_points],
        "sink_factor": sink_factor,
        "dtype": str(denoiser.dtype).replace("torch.", ""),
        "memory_budget_mb": memory_budget_mb,
    }
    layers_out = []
    for acc in cap.layers.values():
        if acc.grid is None:
            raise RuntimeError(f"layer {acc.site.name} was never called during generation")
        layers_out.append(
            LayerResult(
                name=acc.site.name, label=acc.site.label, grid=acc.grid, heads=acc.heads, level=acc.site.level,
                joint=acc.site.joint, ring=acc.ring, hp_ring=acc.hp_ring, mass=acc.mass, hp_pos=acc.hp_pos,
                rows=acc.rows, key_mass=acc.key_mass, probe_maps=acc.probe_maps, probe_rows=acc.probe_rows,
                settings=settings,
            )
        )
    model = {
        "alias": None,
        "source": None,
        "pipeline": type(pipe).__name__,
        "denoiser": type(denoiser).__name__,
        "arch": arch,
        "config_hash": config_hash(denoiser.config),
    }
    model.update(model_info or {})
    import diffusers

    run = {
        "attnprobe": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": str(denoiser.device),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 3),
    }
    return Report(model=model, settings=settings, run=run, layers=layers_out, images=images)
