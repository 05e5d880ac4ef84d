"""How close a distilled student's images are to its teacher's, measured the way the paper measures.

For each (prompt, seed) every model samples with the *same* initial noise and scheduler, so
differences come from the denoiser alone (:func:`evaluate`). Per model, against the teacher:

* **paired image distances** (:mod:`deltadistill.metrics`): PSNR and SSIM of each sample to the
  teacher's sample of the same noise (PSNR of the pooled MSE and the mean of the per-image PSNRs),
  and PSNR **per prompt** over its seeds with the prompt's share of the squared error — the pooled
  PSNR is set by the few prompts with the largest error, and this names them;
* **ε error along the teacher's trajectory**: the teacher's denoiser calls of a sampling run are
  recorded (inputs and outputs, the first ``trajectory_pairs`` pairs), and each model's denoiser is
  run on exactly those inputs; the mean squared difference of the noise predictions (learned-σ
  channels dropped) is reported per denoising step — an error that does not compound. With
  classifier-free guidance the same calls also give the **guided ε error**: the difference of the
  guided predictions u + w·(c − u) that the sampler steps with (guidance multiplies the part of the
  error that differs between the conditional and unconditional rows by w);
* **distributional scores** when DINOv2 / CLIP weights are local (``dino=`` / ``clip=``): FD-DINOv2
  to ``reference_images`` (and to the teacher's samples), the DINOv2 score, the CLIP score; without
  them a one-line note says how to get them;
* on the demo model, the **nearest-photo accuracy** of :mod:`attnprobe.demo.evaluate`.

Models (``variants``): ``distilled`` (the trained blocks on a fresh base pipeline), and the baselines
of :mod:`deltadistill.baselines`: ``untrained`` (the student at step 0), ``no_attention`` (the teacher
with self-attention zeroed), ``neighbourhood`` (training-free K×K neighbourhood attention).
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from attnprobe.core.family import denoiser_of, family_of
from attnprobe.core.pipeline import sample
from deltadistill import metrics
from deltadistill.baselines import neighbourhood_attention, untrained_student, zeroed_self_attention
from deltadistill.generate import base_model_name, to_array
from deltadistill.trajectory import default_guidance, guided, sampler_output

__all__ = ["evaluate", "evaluate_distillation", "VARIANTS", "format_table", "zeroed_self_attention"]

VARIANTS = ("distilled", "untrained", "no_attention", "neighbourhood")
LABELS = {"teacher": "teacher", "distilled": "distilled student", "untrained": "untrained student (step 0)",
          "no_attention": "teacher, self-attention zeroed", "neighbourhood": "neighbourhood attention K={k} (no training)"}
NEIGHBOURHOOD_STUDENT = "student"  # --neighbourhood-kernel student: each layer's window = the student's kernel size


def _labels(names, k) -> dict:
    """Display label of each model; the neighbourhood baseline names its window (one K, or the student's sizes)."""
    nb = ("neighbourhood attention at the student's kernel sizes (no training)" if k == NEIGHBOURHOOD_STUDENT
          else LABELS["neighbourhood"].format(k=k))
    return {n: nb if n == "neighbourhood" else LABELS[n] for n in names}


def student_kernels(config: dict) -> dict[str, int]:
    """{layer name: kernel size} of a distilled run's converted layers (its ``config.json``)."""
    ks = {layer["name"]: int(layer["kernel_size"]) for layer in config.get("layers", []) if layer.get("kernel_size")}
    if not ks:
        raise ValueError("--neighbourhood-kernel student: this run's layers have no kernel sizes "
                         "(a linear-attention student?); give one K instead")
    return ks


class _Recorder:
    """Forward hook on the teacher's denoiser: keeps (args, kwargs, output) of every call, on the CPU."""

    def __init__(self):
        self.calls: list = []

    def __call__(self, module, args, kwargs, output):
        def cpu(x):
            if torch.is_tensor(x):
                return x.detach().cpu()
            if isinstance(x, dict):
                return {k: cpu(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(cpu(v) for v in x)
            return x

        out = output[0] if isinstance(output, (tuple, list)) else output.sample
        self.calls.append((cpu(args), cpu(kwargs), out.detach().cpu()))


def _eps(out: torch.Tensor, channels: int) -> torch.Tensor:
    return sampler_output(out, channels).double()  # the ε half of a learned-σ output, else all of it


def guided_eps(out: torch.Tensor, latent_channels: int, guidance: float, cond_first: bool = False) -> torch.Tensor:
    """The guided prediction u + w·(c − u) of a classifier-free-guidance batch [uncond; cond] (or
    [cond; uncond] with ``cond_first``), on the ε channels: what the sampler steps with."""
    first, second = _eps(out, latent_channels).chunk(2)
    u, c = (second, first) if cond_first else (first, second)
    return guided(c, u, guidance)


@torch.no_grad()
def trajectory_error(den, calls, latent_channels: int, *, samples: int | None = None, guidance: float | None = None,
                     cond_first: bool = False, guided_errors: list | None = None) -> list[float]:
    """Mean squared ε difference of ``den`` to the recorded teacher outputs, per call (denoising step).

    With ``guided_errors`` (a list), ``samples`` and ``guidance``: calls whose batch is a CFG pair
    batch (2 × ``samples`` rows) also append the mean squared difference of the guided predictions
    (:func:`guided_eps`): the output the sampler uses, whose error guidance multiplies by up to w.
    """
    device = next(den.parameters()).device

    def to(x):
        if torch.is_tensor(x):
            return x.to(device)
        if isinstance(x, dict):
            return {k: to(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(to(v) for v in x)
        return x

    errors = []
    for args, kwargs, teacher_out in calls:
        kw = dict(to(kwargs), return_dict=False)
        out = den(*to(args), **kw)[0]
        out = out.cpu()
        errors.append(float(((_eps(out, latent_channels) - _eps(teacher_out, latent_channels)) ** 2).mean()))
        if guided_errors is not None and samples and guidance is not None and out.shape[0] == 2 * samples:
            diff = guided_eps(out, latent_channels, guidance, cond_first) - guided_eps(teacher_out, latent_channels,
                                                                                     guidance, cond_first)
            guided_errors.append(float((diff**2).mean()))
    return errors


def _demo_accuracy(images, prompts) -> float | None:
    from attnprobe.demo.evaluate import nearest_photo_accuracy

    return nearest_photo_accuracy(images, prompts)


def evaluate(distilled_folder, prompts: list[str], seeds: list[int], *, steps: int = 20, resolution=None,
             guidance: float | None = None, out=None, device: str = "cpu", variants=("distilled",),
             neighbourhood_kernel: int | str = 13, dino: str | None = None, clip: str | None = None,
             reference_images=None, trajectory_pairs: int = 4, log=None) -> dict:
    """Sample teacher and ``variants`` from the same noise and measure them (see the module docstring).

    ``neighbourhood_kernel`` is the window of the neighbourhood-attention baseline: one odd K for
    every self-attention layer, or ``"student"``: each converted layer at the distilled student's
    own kernel size (layers the run did not convert keep full attention).

    With ``out`` the images go to ``out/<model>/``, the labelled grid to ``out/grid.png``, the
    figure to ``out/evaluation.png``, the numbers to ``out/metrics.json`` and ``out/metrics.csv``.
    """
    from attnprobe.core.registry import load_pipeline
    from deltadistill import io as dio

    say = log or (lambda msg: None)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    folder = Path(distilled_folder)
    config = dio.read_config(folder)
    base = base_model_name(config)
    train_cfg = json.loads((folder / "train_config.json").read_text()) if (folder / "train_config.json").is_file() else {}
    res = resolution or (config.get("extra") or {}).get("resolution") or train_cfg.get("resolution")
    windows = (student_kernels(config) if neighbourhood_kernel == NEIGHBOURHOOD_STUDENT and "neighbourhood" in variants
               else neighbourhood_kernel)
    pairs = [(p, s) for p in prompts for s in seeds]
    all_p, all_s = [p for p, _ in pairs], [s for _, s in pairs]
    n_traj = min(trajectory_pairs, len(pairs))

    def run(pipe, context=nullcontext()):
        with context:
            return sample(pipe, all_p, all_s, steps=steps, resolution=res, guidance=guidance)

    teacher, _ = load_pipeline(base, device=device)
    channels = int(getattr(teacher, "vae").config.latent_channels)
    say("sampling the teacher")
    images = {"teacher": run(teacher)}
    recorder = _Recorder()
    calls = []
    if n_traj:
        handle = denoiser_of(teacher).register_forward_hook(recorder, with_kwargs=True)
        try:
            sample(teacher, all_p[:n_traj], all_s[:n_traj], steps=steps, resolution=res, guidance=guidance,
                   output_type="latent" if _returns_latents(teacher) else "pil")
        finally:
            handle.remove()
        calls = recorder.calls
    traj, traj_guided = {}, {}
    fam = family_of(denoiser_of(teacher))
    w = float(guidance) if guidance is not None else default_guidance(teacher)
    traj_kw = dict(samples=n_traj, guidance=w, cond_first=fam.cfg_cond_first)
    for name in variants:
        say(f"sampling: {name}")
        if name in ("no_attention", "neighbourhood"):
            ctx = zeroed_self_attention(teacher) if name == "no_attention" else neighbourhood_attention(teacher, windows)
            images[name] = run(teacher, ctx)
            with (zeroed_self_attention(teacher) if name == "no_attention" else neighbourhood_attention(teacher, windows)):
                traj_guided[name] = []
                traj[name] = trajectory_error(denoiser_of(teacher), calls, channels, guided_errors=traj_guided[name],
                                              **traj_kw)
            continue
        if name == "distilled":
            pipe, _ = load_pipeline(base, device=device)
            dio.load(pipe, folder)
        else:
            pipe = untrained_student(base, config, train_cfg, device)
        images[name] = run(pipe)
        traj_guided[name] = []
        traj[name] = trajectory_error(denoiser_of(pipe), calls, channels, guided_errors=traj_guided[name], **traj_kw)
        del pipe
    result = {"distilled_folder": str(folder), "base_model": base, "prompts": list(prompts), "seeds": list(seeds),
              "steps": steps, "resolution": res, "variants": list(variants), "trajectory_pairs": n_traj,
              "neighbourhood_kernel": neighbourhood_kernel, "neighbourhood_windows": windows, "distances": {}, "notes": []}
    ref = to_array(images["teacher"])
    for name in variants:
        arr = to_array(images[name])
        d = metrics.psnr(arr, ref)
        d.update(metrics.ssim(arr, ref) if min(arr.shape[1:3]) >= 7 else {"ssim": float("nan")})
        d["mse_per_image"] = [float(v) for v in ((arr - ref) ** 2).mean(axis=(1, 2, 3))]
        d["psnr_per_prompt"] = [{"prompt": prompts[g.pop("group")], **g}
                                for g in metrics.psnr_by_group(arr, ref, [i // len(seeds) for i in range(len(pairs))])]
        d["eps_error_per_step"] = traj[name]
        d["eps_error"] = float(np.mean(traj[name])) if traj[name] else float("nan")
        d["eps_guided_error_per_step"] = traj_guided[name]
        d["eps_guided_error"] = float(np.mean(traj_guided[name])) if traj_guided[name] else float("nan")
        result["distances"][name] = d
    _distributional(result, images, all_p, dino, clip, reference_images, device)
    if base == "demo":
        result["accuracy"] = {name: _demo_accuracy(imgs, all_p) for name, imgs in images.items()}
    if out is not None:
        _write(result, images, pairs, Path(out), neighbourhood_kernel)
    return result


def _returns_latents(pipe) -> bool:
    from attnprobe.core.family import family_of

    return family_of(denoiser_of(pipe)).returns_latents


def _distributional(result, images, prompts, dino, clip, reference_images, device) -> None:
    """FD-DINOv2, DINOv2 score and CLIP score per model when the encoders are available."""
    if not dino and not clip:
        result["notes"].append("DINOv2 score, FD-DINOv2 and CLIP score skipped: pass --dino and --clip (local folders or "
                               "cached Hub ids, e.g. facebook/dinov2-large-imagenet1k-1-layer, openai/clip-vit-large-patch14)")
        return
    enc = metrics.Encoders(dino=dino, clip=clip, device=device)
    scores = {name: {} for name in images}
    if dino:
        try:
            feats = {name: enc.dino_features(imgs) for name, imgs in images.items()}
            refs = None
            if reference_images:
                from PIL import Image

                files = sorted(p for p in Path(reference_images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
                if len(files) < 2:
                    raise ValueError(f"--reference-images {reference_images} holds fewer than 2 images")
                refs = enc.dino_features([Image.open(f).convert("RGB") for f in files])[0]
            for name, (f, logits) in feats.items():
                if logits is not None:
                    scores[name]["dino_score"] = metrics.inception_score(logits, splits=min(10, len(f)))[0]
                if name != "teacher":
                    scores[name]["fdd_teacher"] = metrics.frechet_distance(f, feats["teacher"][0])
                if refs is not None:
                    scores[name]["fdd_reference"] = metrics.frechet_distance(f, refs)
        except metrics.EncoderUnavailable as exc:
            result["notes"].append(str(exc))
    if clip:
        try:
            for name, imgs in images.items():
                scores[name]["clip_score"] = metrics.clip_score(*enc.clip_embeddings(imgs, prompts))
        except metrics.EncoderUnavailable as exc:
            result["notes"].append(str(exc))
    result["scores"] = scores


def _write(result: dict, images: dict, pairs, out: Path, k: int | str) -> None:
    import pandas as pd

    from deltadistill.grids import labelled_grid

    out.mkdir(parents=True, exist_ok=True)
    for name, imgs in images.items():
        (out / name).mkdir(exist_ok=True)
        for i, img in enumerate(imgs):
            img.save(out / name / f"{i:03d}.png")
    labels = _labels(images, k)
    labelled_grid({labels[n]: images[n] for n in images}, [f"{p} · seed {s}" for p, s in pairs], out / "grid.png",
                  title=f"{result['base_model']}: every row from the same noise, {result['steps']} steps")
    _figure(result, labels, out / "evaluation.png")
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    result["table"] = table_rows(result, labels)
    pd.DataFrame(result["table"]).to_csv(out / "metrics.csv", index=False)
    pd.DataFrame(per_prompt_rows(result)).to_csv(out / "per_prompt.csv", index=False)


def per_prompt_rows(result: dict) -> list[dict]:
    """One row per prompt: each model's PSNR over that prompt's seeds and its share of the model's squared error."""
    rows = [{"prompt": p} for p in result["prompts"]]
    for name in result["variants"]:
        for row, g in zip(rows, result["distances"][name]["psnr_per_prompt"]):
            row[f"{name}_psnr_db"] = g["psnr"]
            row[f"{name}_error_share"] = g["mse_share"]
    return rows


def worst_prompts(result: dict, name: str = "distilled", k: int = 3) -> list[dict]:
    """The ``k`` prompts with the largest share of ``name``'s squared error (they set its pooled PSNR)."""
    groups = result["distances"].get(name, {}).get("psnr_per_prompt") or []
    return sorted(groups, key=lambda g: -g["mse_share"])[:k]


def _finite(v):
    return v if v is not None and math.isfinite(v) else None


def table_rows(result: dict, labels: dict | None = None) -> list[dict]:
    labels = labels or _labels(["teacher", *result["variants"]], result.get("neighbourhood_kernel", 13))
    rows = []
    for name in ["teacher", *result["variants"]]:
        d = result["distances"].get(name, {})
        row = {"model": labels[name], "psnr_db": d.get("psnr"), "psnr_mean_db": d.get("psnr_mean"), "ssim": d.get("ssim"),
               "eps_error": d.get("eps_error"), "eps_guided_error": _finite(d.get("eps_guided_error"))}
        row.update((result.get("scores") or {}).get(name, {}))
        if "accuracy" in result:
            row["accuracy"] = result["accuracy"].get(name)
        rows.append(row)
    return rows


def _figure(result: dict, labels: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = result["variants"]
    groups = result["distances"][names[0]].get("psnr_per_prompt") or []
    per_prompt = len(groups) > 1
    fig = Figure(figsize=(16 if per_prompt else 11, 3.8), layout="constrained")
    axes = fig.subplots(1, 3 if per_prompt else 2, width_ratios=[1, 1.4, 1.1] if per_prompt else [1, 1.4])
    ax1, ax2 = axes[0], axes[1]
    psnrs = [min(result["distances"][n]["psnr"], 60) for n in names]
    ax1.barh([labels[n] for n in names], psnrs, color="#4c72b0")
    for y, v in enumerate(psnrs):
        ax1.text(v, y, f" {v:.1f} dB", va="center", fontsize=8)
    ax1.set_xlabel("PSNR to the teacher's samples (dB, higher is closer)")
    ax1.invert_yaxis()
    for n in names:
        e = result["distances"][n]["eps_error_per_step"]
        if e:
            ax2.plot(np.arange(1, len(e) + 1), e, marker="o", ms=3, label=labels[n])
    ax2.set_yscale("log")
    ax2.set_xlabel(f"denoiser call along the teacher's trajectory (first {result['trajectory_pairs']} samples, CFG batched)")
    ax2.set_ylabel("mean squared ε difference to the teacher")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    if per_prompt:  # which prompts set the pooled PSNR of the first model (the distilled student)
        ax3 = axes[2]
        worst = sorted(groups, key=lambda g: g["psnr"])[:12]
        vals = [min(g["psnr"], 60) for g in worst]
        ax3.barh([g["prompt"] if len(g["prompt"]) <= 32 else g["prompt"][:31] + "…" for g in worst], vals, color="#dd8452")
        ax3.set_xlim(0, 1.4 * max(vals))
        for y, (v, g) in enumerate(zip(vals, worst)):
            ax3.text(v, y, f" {v:.1f} dB · {100 * g['mse_share']:.0f}%", va="center", fontsize=7)
        ax3.invert_yaxis()
        ax3.tick_params(axis="y", labelsize=7)
        ax3.set_xlabel(f"{labels[names[0]]}: PSNR per prompt over its {len(result['seeds'])} seeds (dB)\n"
                       "with its share of the squared error; lowest first", fontsize=8)
    fig.suptitle(f"{result['base_model']}: student and baselines vs the teacher, same noise ({len(result['prompts'])} "
                 f"prompts × {len(result['seeds'])} seeds, {result['steps']} steps)", fontsize=10)
    fig.savefig(path, dpi=110)


def evaluate_distillation(distilled_folder, prompts: list[str], seeds: list[int], *, steps: int = 20, resolution=None,
                          guidance: float | None = None, out=None, device: str = "cpu",
                          variants=("distilled", "untrained", "no_attention"), **kw) -> dict:
    """:func:`evaluate` with the two classic baselines (kept for scripts written before ``evaluate``)."""
    return evaluate(distilled_folder, prompts, seeds, steps=steps, resolution=resolution, guidance=guidance, out=out,
                    device=device, variants=variants, **kw)


def format_table(result: dict) -> str:
    """Markdown table of the distances (for RESULTS.md)."""
    lines = ["| vs. teacher samples | PSNR (dB) | SSIM | ε error along the teacher's trajectory |", "|---|---:|---:|---:|"]
    for row in table_rows(result):
        if row["model"] == "teacher":
            continue
        psnr = "∞" if row["psnr_db"] is not None and math.isinf(row["psnr_db"]) else f"{row['psnr_db']:.2f}"
        lines.append(f"| {row['model']} | {psnr} | {row['ssim']:.4f} | {row['eps_error']:.5f} |")
    return "\n".join(lines)
