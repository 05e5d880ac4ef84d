"""The demo model's parts and recipe settings: tokenizer, text encoder, VAE, PixArt transformer, scheduler.

:class:`TrainConfig` holds every setting of the recipe (:mod:`attnprobe.demo.train` runs it);
the ``build_*`` functions make the untrained components from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from attnprobe.demo.data import CAPTIONS

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


