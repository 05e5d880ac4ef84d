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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from attnprobe.demo.data import CAPTIONS, PHOTOS, CropSampler
from attnprobe.outputs import staged_output_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "</s>")


@dataclass
class TrainConfig:
    """Every knob of the recipe; stored in ``train_config.json`` next to the weights."""

    seed: int = 0
    threads: int = 2
    precision: str = "bf16"  # autocast dtype for matrix products on CPU: bf16 | fp32
    resolution: int = 256
    min_scale: float = 0.5  # crop side as a fraction of the photo's short side
    max_scale: float = 1.0
    # text side
    max_length: int = 16  # tokens per caption during training (the pipeline may pad further; masked)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64, 128)
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_crop: int = 96  # VAE trains on sub-crops of the training-resolution crops (fully convolutional)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5  # on the per-element mean KL
    vae_grad_weight: float = 0.5
    # latents
    crops_per_photo: int = 128
    # transformer
    hidden: int = 192
    heads: int = 6
    layers: int = 8
    patch: int = 2
    attn_init: str = "mimetic"  # mimetic | xavier (self-attention query/key weights, see mimetic_init_)
    attn_init_gain: float = 2.0  # mimetic: scale of W_q = W_k
    steps: int = 2500
    batch: int = 16
    lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # 0 disables Min-SNR weighting
    prediction_type: str = "v_prediction"  # v_prediction | epsilon
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    log_every: int = 50
    captions: list[str] = field(default_factory=lambda: list(CAPTIONS))

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_factor


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def caption_vocabulary(captions: list[str]) -> list[str]:
    """Sorted distinct lower-case words of ``captions``."""
    return sorted({word for caption in captions for word in caption.lower().split()})


def build_tokenizer(captions: list[str], model_max_length: int = 300):
    """Word-level tokenizer over the caption words; appends ``</s>`` like T5's tokenizer does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIAL_TOKENS) + caption_vocabulary(captions))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="</s>",
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_text_encoder(cfg: TrainConfig, vocab_size: int):
    """Tiny T5 encoder with seeded random weights (frozen; it only has to tell captions apart)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(cfg.seed + 1)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=cfg.text_dim,
        d_kv=cfg.text_dim // cfg.text_heads,
        d_ff=2 * cfg.text_dim,
        num_layers=cfg.text_layers,
        num_heads=cfg.text_heads,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        decoder_start_token_id=0,
    )
    model = T5EncoderModel(config).eval()
    model.requires_grad_(False)
    return model


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 2)
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=cfg.resolution,
        scaling_factor=1.0,  # set from the latent statistics after training
        mid_block_add_attention=False,
        force_upcast=False,
    )


def build_transformer(cfg: TrainConfig):
    """PixArt transformer; DiT/PixArt-style init (xavier linears, zero-init output and modulation paths)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(cfg.seed + 3)
    model = PixArtTransformer2DModel(
        sample_size=cfg.latent_size,
        patch_size=cfg.patch,
        in_channels=4,
        out_channels=4,  # ε only (no learned σ): the pipeline uses all output channels
        num_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        attention_head_dim=cfg.hidden // cfg.heads,
        cross_attention_dim=cfg.hidden,
        caption_channels=cfg.text_dim,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
        interpolation_scale=1,
    )
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
    for linear in (model.adaln_single.emb.timestep_embedder.linear_1, model.adaln_single.emb.timestep_embedder.linear_2):
        nn.init.normal_(linear.weight, std=0.02)
    nn.init.zeros_(model.adaln_single.linear.weight)
    nn.init.zeros_(model.adaln_single.linear.bias)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    if cfg.attn_init == "mimetic":
        mimetic_init_(model, cfg.attn_init_gain, seed=cfg.seed + 4)
    elif cfg.attn_init != "xavier":
        raise ValueError(f"unknown attention init {cfg.attn_init!r}; choose xavier or mimetic")
    return model


@torch.no_grad()
def mimetic_init_(model, gain: float, seed: int) -> None:
    """Mimetic initialisation of every self-attention's query and key weights (in place).

    After Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers" (ICML 2023):
    make W_qᵀW_k per head close to a scaled identity, so that at initialisation a token attends to
    tokens whose hidden state resembles its own. Here each head h gets a random orthonormal basis
    Q_h of a head-sized subspace and W_q[h] = W_k[h] = gain · Q_hᵀ, i.e. the attention logits start
    as gain² · ⟨Q_hᵀx_i, Q_hᵀx_j⟩ / √d_head. Since the hidden states start as patch embedding +
    sin-cos position embedding, similar states are mostly nearby tokens: attention starts out
    position-dominated. Training is free to keep or undo this.
    """
    gen = torch.Generator().manual_seed(seed)
    for block in model.transformer_blocks:
        attn = block.attn1
        dim_out, dim_in = attn.to_q.weight.shape
        head_dim = dim_out // attn.heads
        rows = []
        for _ in range(attn.heads):
            basis, _ = torch.linalg.qr(torch.randn(dim_in, head_dim, generator=gen, dtype=torch.float64))
            rows.append(basis.T)
        weight = gain * torch.cat(rows).to(attn.to_q.weight.dtype)
        attn.to_q.weight.copy_(weight)
        attn.to_k.weight.copy_(weight)


def build_scheduler(cfg: TrainConfig):
    """Sampler saved with the pipeline: DPM-Solver++(2M) on the training β schedule and prediction type."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        prediction_type=cfg.prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="linspace",
        lower_order_final=True,
    )


def alphas_cumprod(cfg: TrainConfig) -> torch.Tensor:
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 outputs and attention masks exactly as ``PixArtSigmaPipeline.encode_prompt`` computes them."""
    inputs = tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=max_length,
                       truncation=True, add_special_tokens=True, return_tensors="pt")
    mask = inputs.attention_mask
    embeds = text_encoder(inputs.input_ids, attention_mask=mask)[0]
    return embeds.float(), mask


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


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _tail_mean(values: list[float], n: int = 100) -> float:
    tail = values[-n:]
    return float(sum(tail) / max(1, len(tail)))


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, k=50):
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc = v if i == 0 else acc + (v - acc) / min(k, i + 1)
            out.append(acc)
        return out

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, ylabel, title in ((axes[0], "vae", "loss (L1 + grad + KL)", "VAE"),
                                    (axes[1], "transformer", "Min-SNR weighted MSE", "PixArt transformer")):
        c = curves[key]
        if not c["step"]:
            ax.set_title(f"{title} (not trained in this run)")
            continue
        ax.plot(c["step"], c["loss"], color="0.8", lw=0.6, label="per step")
        ax.plot(c["step"], smooth(c["loss"]), color="C0", lw=1.5, label="running mean")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _portable_tokenizer_names(folder: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both have.

    transformers 5 saves the class under its new name (``TokenizersBackend``), which 4.x cannot
    import; ``PreTrainedTokenizerFast`` is the same class in 5.x and the original one in 4.x.
    """
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    tok_path = folder / "tokenizer" / "tokenizer_config.json"
    tok_config = json.loads(tok_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    for config_path in folder.glob("*/config.json"):  # drop local paths diffusers records on re-saved models
        config = json.loads(config_path.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pipeline(cfg: TrainConfig, out: Path, tokenizer, text_encoder, vae, transformer, curves: dict, summary: dict,
                  overwrite: bool) -> Path:
    """Write the pipeline folder atomically (temporary sibling, then rename)."""
    from diffusers import PixArtSigmaPipeline

    out = Path(out).resolve()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.float(),
        vae=vae.to(torch.float16),
        transformer=transformer.to(torch.float16),
        scheduler=build_scheduler(cfg),
    )
    with staged_output_dir(out, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _portable_tokenizer_names(tmp)
        (tmp / "loss_curve.json").write_text(json.dumps(curves))
        plot_curves(curves, tmp / "loss_curve.png")
        summary = dict(summary, size_bytes=folder_size(tmp))
        record = {"config": dataclasses.asdict(cfg), "results": summary}
        (tmp / "train_config.json").write_text(json.dumps(record, indent=2))
    return out


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
