"""Sample images from a distilled model, optionally side by side with its teacher.

``generate(distilled_folder, prompts, out)`` loads the base pipeline named in the folder's
``config.json`` (:func:`attnprobe.core.registry.load_pipeline`), puts the trained ΔConvBlocks on
it with :func:`deltadistill.io.load`, and writes one PNG per prompt and seed. With
``compare=True`` it also runs the untouched base pipeline (the teacher) with the *same* seeds
and writes one labelled grid, ``compare.png``: a teacher row and a student row, one column per
(prompt, seed), titled.
How each family's pipeline is called is the adapter's business (:func:`attnprobe.core.pipeline.sample`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from attnprobe.core.errors import UserError
from attnprobe.core.pipeline import sample
from attnprobe.core.progress import Progress

__all__ = ["generate", "GenerateError", "read_prompt_file", "load_distilled", "base_model_name"]


class GenerateError(UserError):
    """Bad input to generate (missing folder, empty prompts, existing output)."""


def read_prompt_file(path) -> list[str]:
    """The prompts of a prompt file (:func:`attnprobe.outputs.read_prompts`), errors as GenerateError."""
    from attnprobe.core.outputs import read_prompts

    return read_prompts(path, error=GenerateError)


def base_model_name(config: dict) -> str | None:
    """The name to pass to ``load_pipeline`` for a distilled folder's ``base_model`` entry."""
    base = config.get("base_model")
    if isinstance(base, dict):
        return base.get("alias") or base.get("source")
    return base


def load_distilled(distilled_folder, *, device: str = "cpu", dtype="auto"):
    """Base pipeline from the folder's config + its ΔConvBlocks → ``(pipe, spec, config)``."""
    from attnprobe.core.registry import load_pipeline
    from deltadistill import io

    folder = Path(distilled_folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise GenerateError(f"{folder} is not a distilled model folder (no config.json); train one with `deltadistill train`")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GenerateError(f"cannot read {cfg_path}: {exc}") from None
    base = base_model_name(config)
    if not base:
        raise GenerateError(f"{cfg_path} names no base_model")
    pipe, spec = load_pipeline(base, dtype=dtype, device=device)
    io.load(pipe, folder)
    return pipe, spec, config


def generate(
    distilled_folder,
    prompts,
    out,
    *,
    compare: bool = False,
    seeds=(0,),
    steps: int = 20,
    resolution: int | None = None,
    guidance: float | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Write student images (and a teacher|student grid with ``compare``) to ``out``.

    Args:
        distilled_folder: output of ``deltadistill train`` (``config.json`` + ``delta_blocks.safetensors``).
        prompts: list of prompts (class names/ids for DiT), or a path to a prompt file.
        out: output folder; must be empty or absent unless ``overwrite``.
        seeds: every prompt is sampled with every seed.

    Returns a summary dict: ``{"images": [...], "compare": path or None, ...}``.
    """

    if isinstance(prompts, (str, Path)):
        prompts = read_prompt_file(prompts)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise GenerateError("no prompts given")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise GenerateError("no seeds given")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GenerateError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GenerateError(f"output folder {out} is not empty; pass --overwrite to write into it")

    from attnprobe.core.outputs import check_writable, claim_output

    check_writable(out)
    with claim_output(out):
        return _generate(distilled_folder, prompts, seeds, out, compare=compare, steps=steps, resolution=resolution,
                         guidance=guidance, device=device)


def _generate(distilled_folder, prompts, seeds, out: Path, *, compare, steps, resolution, guidance, device) -> dict:
    from attnprobe.core.registry import load_pipeline

    pipe, spec, config = load_distilled(distilled_folder, device=device)
    res = resolution or (config.get("extra") or {}).get("resolution") or spec.resolution or None
    from attnprobe.core.pipeline import resolve_resolution

    try:
        resolve_resolution(pipe, res)  # a bad size is one line, before any progress output
    except ValueError as exc:
        raise GenerateError(str(exc)) from None
    pairs = [(p, s) for p in prompts for s in seeds]
    all_prompts, all_seeds = [p for p, _ in pairs], [s for _, s in pairs]
    with Progress("generate", steps * (2 if compare else 1), unit="step") as progress:
        student = _sample_counted(pipe, progress, 0, all_prompts, all_seeds, steps=steps, resolution=res, guidance=guidance)
        teacher = None
        if compare:
            del pipe
            base, _ = load_pipeline(base_model_name(config), device=device)
            teacher = _sample_counted(base, progress, steps, all_prompts, all_seeds, steps=steps, resolution=res,
                                      guidance=guidance)

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, ((prompt, seed), img) in enumerate(zip(pairs, student)):
        slug = re.sub(r"[^a-zA-Z0-9]+", "-", prompt).strip("-")[:40] or "prompt"
        path = out / f"{i:03d}-{slug}-seed{seed}.png"
        img.save(path)
        written.append(str(path))
    grid_path = None
    if teacher is not None:
        from deltadistill.grids import labelled_grid

        grid_path = labelled_grid({"teacher": teacher, "student (distilled)": student},
                                  [f"{p} · seed {s}" for p, s in pairs], out / "compare.png",
                                  title=f"{base_model_name(config)}: teacher vs distilled student, same noise, {steps} steps",
                                  max_columns=len(pairs))
    meta = {
        "distilled": str(distilled_folder),
        "base_model": base_model_name(config),
        "prompts": prompts,
        "seeds": seeds,
        "steps": steps,
        "resolution": res,
        "compare": str(grid_path) if grid_path else None,
        "images": written,
    }
    (out / "generate.json").write_text(json.dumps(meta, indent=2))
    return meta


def _sample_counted(pipe, progress, offset: int, *args, **kwargs):
    """:func:`sample`, advancing ``progress`` once per denoiser call (one call per step, CFG batched)."""
    from attnprobe.core.family import denoiser_of

    calls = [offset]

    def hook(module, args_, output):
        calls[0] += 1
        progress.update(calls[0])

    handle = denoiser_of(pipe).register_forward_hook(hook)
    try:
        return sample(pipe, *args, **kwargs)
    finally:
        handle.remove()


def to_array(images) -> np.ndarray:
    """PIL images → float64 array [B, H, W, 3] in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])
