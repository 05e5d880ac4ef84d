"""How close a distilled student's samples are to its teacher's, against two baselines.

For each (prompt, seed) every model samples with the *same* initial noise and scheduler, so
differences come from the denoiser alone. Distances are taken in image space against the
teacher's image (pixels in [0, 1]):

    MSE  = mean over images of mean_{pixels, channels} (x − x_teacher)²
    PSNR = 10 · log10(1 / MSE)   (dB, from the mean MSE; higher is closer)

Variants (:func:`evaluate_distillation`):

* ``distilled``: the trained blocks loaded onto a fresh base pipeline (:func:`deltadistill.io.load`);
* ``untrained``: the same conversion before training (same kernel sizes, gate, init and seed:
  :func:`deltadistill.train.train` seeds torch with the run seed right before ``convert``, so this
  is exactly the student at step 0);
* ``no_attention``: the teacher with every self-attention output replaced by zeros
  (:func:`zeroed_self_attention`) — what the model does without the layers being distilled.

A successful distillation puts ``distilled`` much closer to the teacher than both baselines.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch

from attnprobe.core.pipeline import sample
from deltadistill.generate import base_model_name, image_grid, to_array

__all__ = ["zeroed_self_attention", "image_distance", "evaluate_distillation"]


@contextmanager
def zeroed_self_attention(pipe):
    """Context manager: every self-attention module of ``pipe``'s denoiser outputs zeros.

    Forward hooks replace the module output with ``zeros_like(output)``; they are removed on
    exit, even on error. Raises if the model has no self-attention to zero.
    """
    from attnprobe.core.family import denoiser_of, find_self_attention

    den = denoiser_of(pipe)
    sites = find_self_attention(den)
    handles = []

    def hook(module, args, output):
        if isinstance(output, tuple):
            return tuple(torch.zeros_like(o) if torch.is_tensor(o) else o for o in output)
        return torch.zeros_like(output)  # [B, N, C]

    try:
        for site in sites:
            handles.append(den.get_submodule(site.name).register_forward_hook(hook))
        yield pipe
    finally:
        for h in handles:
            h.remove()


def image_distance(images, reference) -> dict:
    """``{"mse", "psnr", "mse_per_image"}`` of PIL images against reference PIL images (pixels in [0, 1])."""
    a, b = to_array(images), to_array(reference)  # [B, H, W, 3]
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    per = ((a - b) ** 2).mean(axis=(1, 2, 3))  # [B]
    mse = float(per.mean())
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
    return {"mse": mse, "psnr": psnr, "mse_per_image": [float(v) for v in per]}


def evaluate_distillation(
    distilled_folder,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = 20,
    resolution: int | None = None,
    guidance: float | None = None,
    out=None,
    device: str = "cpu",
) -> dict:
    """Distances to the teacher of: the distilled student, the untrained student, no self-attention.

    Every prompt is sampled with every seed. With ``out`` the images go to ``out/<variant>/`` and
    a grid ``out/grid.png`` (rows: samples; columns: teacher, distilled, untrained, no attention),
    and the numbers to ``out/distances.json``. Returns ``{"distances": {variant: {...}}, ...}``.
    """
    from attnprobe.core.registry import load_pipeline
    from deltadistill import io as dio
    from deltadistill.conversion import convert

    folder = Path(distilled_folder)
    config = dio.read_config(folder)
    base = base_model_name(config)
    extra = config.get("extra") or {}
    train_cfg = {}
    if (folder / "train_config.json").is_file():
        train_cfg = json.loads((folder / "train_config.json").read_text())
    res = resolution or extra.get("resolution") or train_cfg.get("resolution")
    pairs = [(p, s) for p in prompts for s in seeds]
    all_p, all_s = [p for p, _ in pairs], [s for _, s in pairs]

    def run(pipe):
        return sample(pipe, all_p, all_s, steps=steps, resolution=res, guidance=guidance)

    teacher_pipe, _ = load_pipeline(base, device=device)
    images = {"teacher": run(teacher_pipe)}
    with zeroed_self_attention(teacher_pipe):
        images["no_attention"] = run(teacher_pipe)
    del teacher_pipe

    pipe, _ = load_pipeline(base, device=device)
    dio.load(pipe, folder)
    images["distilled"] = run(pipe)
    del pipe

    # the student at step 0: same kernel sizes per layer, block settings, init and seed as the run
    pipe, _ = load_pipeline(base, device=device)
    layers = config["layers"]
    first = layers[0]
    torch.manual_seed(int(train_cfg.get("seed", 0)))
    convert(
        pipe,
        {layer["name"]: int(layer["kernel_size"]) for layer in layers},
        gate=first.get("gate", "scaled"),
        gate_scale=train_cfg.get("gate_scale") if first.get("gate", "scaled") == "scaled" else None,
        pool=first.get("pool", "ceil"),
        dw_bias=bool(first.get("dw_bias", True)),
        inter_ratio=first.get("inter_ratio", 0.5),
        scales=tuple(first.get("scales", (1, 0.5))),
        init=train_cfg.get("init", "mean_field"),
    )
    images["untrained"] = run(pipe)
    del pipe

    distances = {k: image_distance(images[k], images["teacher"]) for k in ("distilled", "untrained", "no_attention")}
    result = {
        "distilled_folder": str(folder),
        "base_model": base,
        "prompts": list(prompts),
        "seeds": list(seeds),
        "steps": steps,
        "resolution": res,
        "distances": distances,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name, imgs in images.items():
            (out / name).mkdir(exist_ok=True)
            for i, img in enumerate(imgs):
                img.save(out / name / f"{i:03d}.png")
        order = ["teacher", "distilled", "untrained", "no_attention"]
        image_grid([[images[k][i] for k in order] for i in range(len(pairs))]).save(out / "grid.png")
        (out / "distances.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    """Markdown table of the three distances (for RESULTS.md)."""
    labels = {
        "distilled": "distilled student",
        "untrained": "untrained student (step 0)",
        "no_attention": "teacher, self-attention zeroed",
    }
    rows = ["| vs. teacher samples | pixel MSE | PSNR (dB) |", "|---|---:|---:|"]
    for key, label in labels.items():
        d = result["distances"][key]
        rows.append(f"| {label} | {d['mse']:.5f} | {d['psnr']:.2f} |")
    return "\n".join(rows)
