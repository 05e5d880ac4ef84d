"""Stable Diffusion 1.x / 2.x UNets (``UNet2DConditionModel`` without SDXL's text-time embedding).

Self-attention: every ``attn1`` inside the UNet's transformer blocks, labelled
``down.<b>.<a>[.<t>].attn1`` / ``mid.<a>.attn1`` / ``up.<b>.<a>.attn1``. The base token grid is the
latent itself; down block b (and up block n−1−b, and the mid block at n−1) works on it halved b
times. An image side must be divisible by vae · 2^(n−1).
"""
from __future__ import annotations

import re

import math

import torch

from attnprobe.core import tiny
from attnprobe.core.family import Alias, Family
from attnprobe.core.sites import AttnSite, UnsupportedModelError

_DOWN_UP = re.compile(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$")
_MID = re.compile(r"mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$")


class UNet(Family):
    name = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    pipeline_classes = ("StableDiffusionPipeline",)
    aliases = (Alias("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", 512,
                     "Stable Diffusion 1.5 UNet"),)

    paper_block = {"gate": "scaled", "gate_scale": "official", "pool": "adaptive", "dw_bias": False}
    # official SD1.5 kernel table, by block index (None: no attention there)
    paper_kernels = {"down": (7, 9, 5, None), "mid": (3,), "up": (None, 5, 9, 11)}

    def matches(self, denoiser) -> bool:
        return super().matches(denoiser) and getattr(denoiser.config, "addition_embed_type", None) != "text_time"

    def paper_kernel_size(self, site) -> int | None:
        kind, index = site.label.split(".")[:2]
        table = self.paper_kernels.get(kind, ())
        i = 0 if kind == "mid" else int(index)
        return table[i] if i < len(table) else None

    def residual_tap(self, site) -> str:
        return site.name.rsplit(".", 1)[0] + ".norm2"  # BasicTransformerBlock: norm2(residual) → cross-attention

    def self_attention(self, denoiser) -> list[AttnSite]:
        n_down = len(denoiser.config.down_block_types)
        sites = []
        for name, mod in denoiser.named_modules():
            if name.endswith(".attn1"):
                level, label = self._level(name, n_down)
                sites.append(AttnSite(name, label, self.name, level=level, module=mod))
        return sites

    @staticmethod
    def _level(name: str, n_down: int) -> tuple[int, str]:
        """Downsampling level and user-facing label of a UNet attn1 module."""
        m = _DOWN_UP.match(name)
        if m:
            kind, b, a, t = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
            level = b if kind == "down" else n_down - 1 - b
            return level, f"{kind}.{b}.{a}{f'.{t}' if t else ''}.attn1"
        m = _MID.match(name)
        if m:
            a, t = int(m.group(1)), int(m.group(2))
            return n_down - 1, f"mid.{a}{f'.{t}' if t else ''}.attn1"
        raise UnsupportedModelError(f"unexpected UNet self-attention module {name!r}")

    def patch(self, config) -> int:
        return 1

    def grid_divisor(self, config, vae_factor) -> int:
        return vae_factor * 2 ** (len(config.down_block_types) - 1)

    def call_kwargs(self, pipe, prompts, *, height, width) -> dict:
        return {"prompt": list(prompts), "height": int(height), "width": int(width)}

    def encode_conditions(self, pipe, prompts, resolution) -> dict[str, torch.Tensor]:
        device = getattr(pipe, "_execution_device", "cpu")
        emb, _ = pipe.encode_prompt(list(prompts), device, 1, False)
        return {"encoder_hidden_states": emb.detach().cpu()}  # [M, L, D]

    def random_inputs(self, denoiser, resolution, vae_factor, *, text_len, device, dtype, batch=1, seed=0) -> dict:
        cfg = denoiser.config
        lat = resolution // vae_factor
        g = torch.Generator("cpu").manual_seed(seed)
        cond = {"encoder_hidden_states": torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g).to(device, dtype)}
        cond.update(self._extra_random(cfg, resolution, g, device, dtype, batch))
        return {"sample": torch.randn(batch, cfg.in_channels, lat, lat, generator=g).to(device, dtype),
                "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
                **self.denoiser_kwargs(denoiser, cond, resolution), "return_dict": False}

    def _extra_random(self, cfg, resolution, g, device, dtype, batch) -> dict:
        return {}

    def tiny_builders(self):
        return {"tiny-sd15": (build_tiny_sd15, "random-weight tiny SD1.5-like UNet (tests)", 32)}

    def random_pipeline(self, denoiser, vae_factor: int):
        """Real-size UNet; a 1-layer CLIP text encoder of width cross_attention_dim and a tiny VAE."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        cfg = denoiser.config
        if cfg.get("addition_embed_type"):
            return super().random_pipeline(denoiser, vae_factor)  # SDXL-style conditioning: not built here
        levels = int(round(math.log2(vae_factor))) + 1
        return StableDiffusionPipeline(
            vae=tiny.vae(latent_channels=int(cfg.in_channels), levels=levels),
            text_encoder=tiny.clip(hidden=int(cfg.cross_attention_dim), intermediate=64, layers=1),
            tokenizer=tiny.tiny_tokenizer(), unet=denoiser, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_unet(xl: bool, seed: int):
    """A two-level UNet with self-attention at both levels (SDXL: two transformer layers at level 1)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    if xl:
        kw.update(cross_attention_dim=64, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    else:
        kw.update(cross_attention_dim=32)
    return UNet2DConditionModel(**kw).eval()


def build_tiny_sd15(seed: int = 0):
    """SD1.5-like pipeline: UNet with self-attention at two levels; 32 px → 16×16 latent."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny.vae(seed=seed), text_encoder=tiny.clip(seed=seed), tokenizer=tiny.tiny_tokenizer(),
        unet=tiny_unet(False, seed), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
