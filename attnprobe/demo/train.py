"""Train the demo model from scratch and write it as a diffusers pipeline folder.

One command, seeded and reproducible (for a given machine and thread count)::

    python -m attnprobe.demo.train --out attnprobe/demo/pipeline --threads 2

or the same recipe in two stages (how the shipped weights were made; the second stage reuses the
first stage's VAE, loss curve and timings)::

    python -m attnprobe.demo.train --out /tmp/demo-vae --steps 0 --threads 2
    python -m attnprobe.demo.train --out attnprobe/demo/pipeline --vae-from /tmp/demo-vae --threads 2

The recipe, all on CPU:

1. **Tokenizer and text encoder.** A word-level tokenizer over the caption vocabulary
   (``[PAD]``, ``[UNK]``, ``</s>`` appended to every caption) built with ``tokenizers`` and wrapped
   in ``PreTrainedTokenizerFast``; a tiny ``T5EncoderModel`` with seeded random weights, frozen.
   Its outputs for the captions and for the empty prompt (used for classifier-free guidance) are
   computed once.
2. **VAE.** A small ``AutoencoderKL`` (four levels, 8x downsampling, 4 latent channels, no
   attention) trained on random crops of the photos (:mod:`attnprobe.demo.data`) with an L1 loss,
   an L1 loss on image gradients (for sharper edges) and a small KL term.
3. **Latents.** ``--crops-per-photo`` seeded random crops per photo at the training resolution are
   encoded once (posterior mean and std kept; a fresh latent is drawn from them at every step).
   ``scaling_factor`` = 1 / std of those latents, stored in the VAE config.
4. **Transformer.** A ``PixArtTransformer2DModel`` (adaLN-single, cross-attention to the T5
   tokens) trained with the v-prediction objective (v = √ᾱ·ε − √(1−ᾱ)·x₀) on the DDPM linear β
   schedule (1000 steps, β 1e-4 → 2e-2, the schedule of PixArt), Min-SNR-γ loss weights
   (min(SNR, γ)/(SNR + 1) for v), caption dropout to the empty prompt, AdamW with warm-up and cosine decay, gradient clipping and an EMA of the weights
   (the EMA weights are shipped). The query and key weights of every self-attention start from a
   *mimetic* initialisation (Trockman & Kolter, ICML 2023; :func:`mimetic_init_`): per head
   W_q = W_k = gain · Qᵀ for a random orthonormal Q, so attention logits start as a scaled
   similarity of hidden states, which at initialisation are dominated by the sin-cos position
   embedding: attention starts position-dominated (ERF 7-9 on the 16x16 grid) instead of
   uniform (ERF 23 with xavier init, ``--attn-init xavier``). Training then moves each layer;
   ``benchmarks/demo_locality.py`` measures both starting points against the trained weights.
   Matrix products run under bfloat16 autocast by default
   (``--precision fp32`` to turn it off); weights and optimiser state stay float32.
   Why v and not PixArt's ε: with ε-prediction the implied x₀ = (x_t − √(1−ᾱ)·ε̂)/√ᾱ amplifies
   the prediction error by 1/√ᾱ_T ≈ 160 at the first sampling step of this schedule; a model
   trained for minutes on a CPU is not accurate enough for that, and a first trial (ε, 1500
   steps) produced latents with outliers 20x outside the data range. v-prediction has no such
   amplification. (``--prediction-type epsilon`` is kept as an option.)
5. **Output.** ``PixArtSigmaPipeline`` with a ``DPMSolverMultistepScheduler`` (same β schedule,
   same prediction type), saved as safetensors — transformer and VAE in float16 (loads into float32 with
   ``torch_dtype=torch.float32``), the tiny text encoder in float32 — plus ``train_config.json``,
   ``loss_curve.json`` and ``loss_curve.png``. The folder is written to a temporary sibling and
   renamed into place; an existing folder is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from attnprobe.demo.components import (  # noqa: F401  (re-exported: the recipe's parts)
    SPECIAL_TOKENS,
    TrainConfig,
    alphas_cumprod,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    build_vae,
    caption_vocabulary,
    encode_text,
    mimetic_init_,
)
from attnprobe.demo.data import PHOTOS, CropSampler
from attnprobe.demo.save import _tail_mean, folder_size, plot_curves, save_pipeline  # noqa: F401


# --------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------


def _autocast(cfg: TrainConfig):
    if cfg.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision {cfg.precision!r}; choose bf16 or fp32")


def _lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` × lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _image_grads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def train_vae(cfg: TrainConfig, sampler: CropSampler, progress, log) -> tuple[nn.Module, dict]:
    """Train the VAE on random sub-crops; returns (vae, curve)."""
    vae = build_vae(cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    curve = {"step": [], "loss": [], "l1": [], "kl": []}
    task = progress.add_task("VAE", total=cfg.vae_steps, info="")
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, min(100, cfg.vae_steps // 10 + 1))
        images, _ = sampler.batch(cfg.vae_batch, gen)
        if cfg.vae_crop < cfg.resolution:
            offs = torch.randint(0, cfg.resolution - cfg.vae_crop + 1, (cfg.vae_batch, 2), generator=gen).tolist()
            images = torch.stack([im[:, a : a + cfg.vae_crop, b : b + cfg.vae_crop] for im, (a, b) in zip(images, offs)])
        x = images * 2.0 - 1.0
        with _autocast(cfg):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            rec = vae.decode(z).sample
        rec = rec.float()
        l1 = (rec - x).abs().mean()
        (rx, ry), (tx, ty) = _image_grads(rec), _image_grads(x)
        lgrad = (rx - tx).abs().mean() + (ry - ty).abs().mean()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = l1 + cfg.vae_grad_weight * lgrad + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        curve["step"].append(step)
        curve["loss"].append(loss.item())
        curve["l1"].append(l1.item())
        curve["kl"].append(kl.item())
        progress.update(task, advance=1, info=f"loss {curve['loss'][-1]:.4f} l1 {curve['l1'][-1]:.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            n = min(cfg.log_every, len(curve["l1"]))
            log(f"vae step {step + 1}/{cfg.vae_steps} loss {sum(curve['loss'][-n:]) / n:.4f} "
                f"l1 {sum(curve['l1'][-n:]) / n:.4f} kl {curve['kl'][-1]:.2f}")
    return vae.eval(), curve


@torch.no_grad()
def encode_latents(cfg: TrainConfig, vae, sampler: CropSampler, progress, batch: int = 16):
    """Seeded crops → posterior (mean, std) [N, 4, h, w] and labels [N]."""
    images, labels = sampler.fixed(cfg.crops_per_photo, seed=cfg.seed + 20)
    means, stds = [], []
    task = progress.add_task("latents", total=len(images), info="")
    for i in range(0, len(images), batch):
        x = images[i : i + batch] * 2.0 - 1.0
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
        progress.update(task, advance=len(x))
    return torch.cat(means), torch.cat(stds), labels


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def train_transformer(cfg: TrainConfig, latents, text, progress, log) -> tuple[nn.Module, dict]:
    """Diffusion training (``cfg.prediction_type``) on cached latents; returns (EMA transformer, curve)."""
    lat_mean, lat_std, labels, scale = latents
    embeds, masks = text  # [C + 1, L, D], last row = empty prompt
    null = embeds.shape[0] - 1
    model = build_transformer(cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay_params = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed.proj" not in n]
    other_params = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed.proj" not in n)]
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": cfg.weight_decay},
                             {"params": other_params, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    ac = alphas_cumprod(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 30)
    curve = {"step": [], "loss": [], "mse": []}
    task = progress.add_task("transformer", total=cfg.steps, info="")
    no_cond = {"resolution": None, "aspect_ratio": None}
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.steps, cfg.warmup)
        idx = torch.randint(0, len(labels), (cfg.batch,), generator=gen)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        cond = torch.where(drop, torch.full_like(labels[idx], null), labels[idx])
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        with _autocast(cfg):
            pred = model(xt, encoder_hidden_states=embeds[cond], encoder_attention_mask=masks[cond], timestep=t,
                         added_cond_kwargs=no_cond).sample
        if cfg.prediction_type == "epsilon":
            target = noise
        elif cfg.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1.0 - a).sqrt() * x0
        else:
            raise ValueError(f"unknown prediction type {cfg.prediction_type!r}")
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:  # Min-SNR-γ: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v
            snr = ac[t] / (1.0 - ac[t])
            weight = snr.clamp(max=cfg.min_snr_gamma) / (snr + 1.0 if cfg.prediction_type == "v_prediction" else snr)
        else:
            weight = torch.ones_like(per_sample)
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, model, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        curve["step"].append(step)
        curve["loss"].append(loss.item())
        curve["mse"].append(per_sample.mean().item())
        progress.update(task, advance=1, info=f"loss {curve['loss'][-1]:.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = min(cfg.log_every, len(curve["loss"]))
            log(f"transformer step {step + 1}/{cfg.steps} loss {sum(curve['loss'][-n:]) / n:.4f} "
                f"mse {sum(curve['mse'][-n:]) / n:.4f} lr {opt.param_groups[0]['lr']:.2e}")
    return ema, curve


def train(cfg: TrainConfig, out: Path, overwrite: bool = False, quiet: bool = False, vae_from: Path | None = None) -> dict:
    """Run the whole recipe and write the pipeline to ``out``; returns the results summary."""
    from rich.console import Console

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    console = Console(stderr=True, quiet=quiet)
    started = time.time()

    def log(msg: str) -> None:
        console.log(f"[{time.time() - started:7.1f}s] {msg}")

    log(f"photos: {', '.join(p.name for p in PHOTOS)}; resolution {cfg.resolution}, latent {cfg.latent_size}, "
        f"tokens {cfg.latent_size // cfg.patch}x{cfg.latent_size // cfg.patch}, threads {torch.get_num_threads()}")
    sampler = CropSampler(cfg.resolution, min_scale=cfg.min_scale, max_scale=cfg.max_scale)
    tokenizer = build_tokenizer(cfg.captions)
    text_encoder = build_text_encoder(cfg, vocab_size=len(tokenizer))
    embeds, masks = encode_text(tokenizer, text_encoder, list(cfg.captions) + [""], cfg.max_length)

    with _progress() if not quiet else contextlib.nullcontext(_NullProgress()) as progress:
        t0 = time.time()
        vae_stage: dict = {}
        if vae_from is not None:  # two-stage use: reuse the VAE (and its loss curve and timings) of an earlier run
            vae, vae_curve, vae_stage = _load_vae_stage(Path(vae_from))
            log(f"VAE loaded from {vae_from} (trained there, not in this run)")
        else:
            vae, vae_curve = train_vae(cfg, sampler, progress, log)
        vae_time = vae_stage.get("vae_seconds", time.time() - t0)
        t0 = time.time()
        lat_mean, lat_std, labels = encode_latents(cfg, vae, sampler, progress)
        samples = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=torch.Generator().manual_seed(cfg.seed + 21))
        scale = float(1.0 / samples.std())
        vae.register_to_config(scaling_factor=scale)
        latent_time = time.time() - t0
        log(f"latents {tuple(lat_mean.shape)}: mean {float(samples.mean()):.3f} std {float(samples.std()):.3f} "
            f"→ scaling_factor {scale:.4f}; posterior std/|mean| {float(lat_std.mean() / lat_mean.abs().mean()):.3f}")
        t0 = time.time()
        transformer, tr_curve = train_transformer(cfg, (lat_mean, lat_std, labels, scale), (embeds, masks), progress, log)
        transformer_time = time.time() - t0

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "vae_seconds": round(vae_time, 1),
        "latent_seconds": round(latent_time, 1),
        "transformer_seconds": round(transformer_time, 1),
        "total_seconds": round(time.time() - started + (vae_time if vae_from is not None else 0.0), 1),
        "vae_from": str(vae_from) if vae_from is not None else None,
        "vae_final_loss": vae_stage.get("vae_final_loss", _tail_mean(vae_curve["loss"])),
        "vae_final_l1": vae_stage.get("vae_final_l1", _tail_mean(vae_curve["l1"])),
        "transformer_final_loss": _tail_mean(tr_curve["loss"]),
        "transformer_final_mse": _tail_mean(tr_curve["mse"]),
        "scaling_factor": scale,
        "latent_mean": float(samples.mean()),
        "num_latents": int(lat_mean.shape[0]),
        "transformer_params": sum(p.numel() for p in transformer.parameters()),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
        "token_grid": [cfg.latent_size // cfg.patch] * 2,
        "final_losses_are": "mean over the last 100 steps",
    }
    path = save_pipeline(cfg, out, tokenizer, text_encoder, vae, transformer,
                         {"vae": vae_curve, "transformer": tr_curve}, summary, overwrite)
    summary["size_bytes"] = folder_size(path)
    log(f"wrote {path} ({summary['size_bytes'] / 1e6:.1f} MB) in {summary['total_seconds'] / 60:.1f} min")
    return summary


def _load_vae_stage(folder: Path):
    """VAE of an earlier run's pipeline folder, with its loss curve and VAE timings when recorded."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    curve = {"step": [], "loss": [], "l1": [], "kl": []}
    if (folder / "loss_curve.json").is_file():
        curve = json.loads((folder / "loss_curve.json").read_text()).get("vae", curve)
    stage = {}
    if (folder / "train_config.json").is_file():
        results = json.loads((folder / "train_config.json").read_text()).get("results", {})
        stage = {k: results[k] for k in ("vae_seconds", "vae_final_loss", "vae_final_l1") if k in results}
    return vae, curve, stage


class _NullProgress:
    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m attnprobe.demo.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "pipeline", help="pipeline folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision, help="autocast dtype for training")
    p.add_argument("--steps", type=int, default=d.steps, help="transformer steps")
    p.add_argument("--batch", type=int, default=d.batch, help="transformer batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="transformer learning rate")
    p.add_argument("--warmup", type=int, default=d.warmup, help="transformer warm-up steps")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--prediction-type", choices=["v_prediction", "epsilon"], default=d.prediction_type)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--crops-per-photo", type=int, default=d.crops_per_photo, help="cached latents per photo")
    p.add_argument("--layers", type=int, default=d.layers, help="transformer blocks")
    p.add_argument("--hidden", type=int, default=d.hidden, help="transformer width")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    p.add_argument("--attn-init", choices=["xavier", "mimetic"], default=d.attn_init,
                   help="self-attention query/key initialisation (mimetic: W_q W_kᵀ ≈ gain² · identity per head)")
    p.add_argument("--attn-init-gain", type=float, default=d.attn_init_gain, help="gain of the mimetic initialisation")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="reuse the VAE of an earlier pipeline folder (e.g. one written with --steps 0) instead of "
                        "training one; its VAE loss curve and timings are carried over")
    args = p.parse_args(argv)
    if not (args.attn_init_gain > 0 and math.isfinite(args.attn_init_gain)):
        p.error(f"--attn-init-gain must be a positive number, got {args.attn_init_gain}")
    cfg = dataclasses.replace(
        d, seed=args.seed, threads=args.threads, precision=args.precision, steps=args.steps, batch=args.batch,
        lr=args.lr, warmup=min(args.warmup, max(1, args.steps // 5)), ema_decay=args.ema_decay,
        prediction_type=args.prediction_type,
        vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_lr=args.vae_lr, crops_per_photo=args.crops_per_photo,
        layers=args.layers, hidden=args.hidden, heads=args.heads, log_every=args.log_every,
        attn_init=args.attn_init, attn_init_gain=args.attn_init_gain,
    )
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    try:
        summary = train(cfg, args.out, overwrite=args.overwrite, quiet=args.quiet, vae_from=args.vae_from)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
