"""Sample images from a distilled model, optionally side by side with its teacher.

``generate(distilled_folder, prompts, out)`` loads the base pipeline named in the folder's
``config.json`` (:func:`attnprobe.registry.load_pipeline`), puts the trained ΔConvBlocks on it
with :func:`deltadistill.io.load`, and writes one PNG per prompt and seed. With
``compare=True`` it also runs the untouched base pipeline (the teacher) with the *same* seeds
and writes one grid, ``compare.png``: one row per (prompt, seed), teacher left, student right.

:func:`sample` is the one place that knows how each pipeline family is called (PixArt needs
``use_resolution_binning=False`` and a ``max_sequence_length`` its tokenizer supports; DiT takes
class labels instead of prompts); training data (:mod:`deltadistill.data`) and evaluation
(:mod:`deltadistill.evaluate`) use it too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["generate", "sample", "class_labels_for", "image_grid", "GenerateError", "read_prompt_file"]


class GenerateError(ValueError):
    """Bad input to generate (missing folder, empty prompts, existing output)."""


def read_prompt_file(path) -> list[str]:
    """The prompts of a prompt file (:func:`attnprobe.outputs.read_prompts`), errors as GenerateError."""
    from attnprobe.outputs import read_prompts

    return read_prompts(path, error=GenerateError)


def _arch(pipe) -> str:
    from attnprobe.arch import denoiser_of, detect_arch

    return detect_arch(denoiser_of(pipe))


def max_sequence_length(pipe, default: int = 300) -> int:
    """Longest prompt the pipeline's tokenizer supports (PixArt default 300; tiny tokenizers 16)."""
    tok = getattr(pipe, "tokenizer", None)
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 100_000:
        return min(default, limit)
    return default


def class_labels_for(pipe, prompts) -> list[int]:
    """DiT class ids for prompts that are label names (as in ``pipe.labels``) or integers."""
    ids = []
    n_classes = int(getattr(getattr(pipe, "transformer", None), "config", {}).get("num_embeds_ada_norm", 1000) or 1000)
    for p in prompts:
        p = str(p).strip()
        if re.fullmatch(r"\d+", p):
            ids.append(int(p))
        elif p in getattr(pipe, "labels", {}):
            ids.append(int(pipe.labels[p]))
        else:
            known = ", ".join(list(getattr(pipe, "labels", {}))[:8])
            raise GenerateError(f"{p!r} is not a class of this class-conditional model; use a class id or one of: {known}")
        if not 0 <= ids[-1] < n_classes:
            raise GenerateError(f"class id {ids[-1]} is out of range [0, {n_classes})")
    return ids


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = 20,
    resolution: int | None = None,
    guidance: float | None = None,
    output_type: str = "pil",
):
    """Run ``pipe`` once per (prompt, seed) pair, batched; returns the pipeline's ``images``.

    ``prompts`` and ``seeds`` have equal length (one generator per image, so results do not
    depend on the batch size). ``output_type="latent"`` returns model-space latents
    [B, C, h, w] (DiT pipelines cannot, and raise). ``resolution`` is the image side in pixels
    (DiT models have a fixed one and ignore it).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    arch = _arch(pipe)
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    kw = dict(num_inference_steps=int(steps), generator=gens, output_type=output_type)
    if guidance is not None:
        kw["guidance_scale"] = float(guidance)
    if arch == "dit":
        if output_type == "latent":
            raise ValueError("DiT pipelines cannot return latents; sample images and encode them instead")
        return pipe(class_labels=class_labels_for(pipe, prompts), **kw).images
    if resolution:
        kw.update(height=int(resolution), width=int(resolution))
    if arch == "pixart":
        kw.update(use_resolution_binning=False, clean_caption=False, max_sequence_length=max_sequence_length(pipe))
    return pipe(prompt=list(prompts), **kw).images


def image_grid(rows: list[list], pad: int = 2, background: int = 255):
    """Paste a list of rows of PIL images (equal sizes) into one PIL image."""
    from PIL import Image

    w, h = rows[0][0].size
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * w + (ncol + 1) * pad, len(rows) * h + (len(rows) + 1) * pad), (background,) * 3)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def base_model_name(config: dict) -> str | None:
    """The name to pass to ``load_pipeline`` for a distilled folder's ``base_model`` entry."""
    base = config.get("base_model")
    if isinstance(base, dict):
        return base.get("alias") or base.get("source")
    return base


def load_distilled(distilled_folder, *, device: str = "cpu", dtype="auto"):
    """Base pipeline from the folder's config + its ΔConvBlocks → ``(pipe, spec, config)``."""
    from attnprobe.registry import load_pipeline
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
    from attnprobe.registry import load_pipeline

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

    pipe, spec, config = load_distilled(distilled_folder, device=device)
    res = resolution or (config.get("extra") or {}).get("resolution") or spec.resolution or None
    pairs = [(p, s) for p in prompts for s in seeds]
    all_prompts, all_seeds = [p for p, _ in pairs], [s for _, s in pairs]
    student = sample(pipe, all_prompts, all_seeds, steps=steps, resolution=res, guidance=guidance)
    teacher = None
    if compare:
        del pipe
        base, _ = load_pipeline(base_model_name(config), device=device)
        teacher = sample(base, all_prompts, all_seeds, steps=steps, resolution=res, guidance=guidance)

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, ((prompt, seed), img) in enumerate(zip(pairs, student)):
        slug = re.sub(r"[^a-zA-Z0-9]+", "-", prompt).strip("-")[:40] or "prompt"
        path = out / f"{i:03d}-{slug}-seed{seed}.png"
        img.save(path)
        written.append(str(path))
    grid_path = None
    if teacher is not None:
        grid_path = out / "compare.png"
        image_grid([[t, s] for t, s in zip(teacher, student)]).save(grid_path)
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


def to_array(images) -> np.ndarray:
    """PIL images → float64 array [B, H, W, 3] in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])
