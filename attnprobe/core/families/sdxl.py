"""Stable Diffusion XL (``UNet2DConditionModel`` with the text-time embedding).

Everything spatial is the UNet's (:mod:`attnprobe.core.families.unet`); SDXL adds a second text
encoder whose pooled embedding and the size/crop ``time_ids`` enter as ``added_cond_kwargs``.
"""
from __future__ import annotations

import torch

from attnprobe.core import tiny
from attnprobe.core.families.unet import UNet, tiny_unet
from attnprobe.core.family import Alias, Family


class SDXL(UNet):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    priority = 1  # before the plain UNet
    aliases = (Alias("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", 1024,
                     "Stable Diffusion XL base 1.0 UNet"),)

    paper_kernels = {"down": (None, 9, 7), "mid": (9,), "up": (9, 13, None)}  # official SDXL table

    def matches(self, denoiser) -> bool:
        return Family.matches(self, denoiser) and getattr(denoiser.config, "addition_embed_type", None) == "text_time"

    @staticmethod
    def time_ids(resolution: int, n: int, dtype=torch.float32) -> torch.Tensor:
        """[n, 6]: original size, crop top-left, target size."""
        return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=dtype)

    def encode_conditions(self, pipe, prompts, resolution) -> dict[str, torch.Tensor]:
        device = getattr(pipe, "_execution_device", "cpu")
        emb, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb.detach().cpu(), "text_embeds": pooled.detach().cpu(),
                "time_ids": self.time_ids(resolution, len(prompts), emb.dtype)}

    def denoiser_kwargs(self, denoiser, cond, resolution) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}}

    def _extra_random(self, cfg, resolution, g, device, dtype, batch) -> dict:
        n_text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return {"text_embeds": torch.randn(batch, n_text, generator=g).to(device, dtype),
                "time_ids": self.time_ids(resolution, batch).to(device, dtype)}

    def tiny_builders(self):
        return {"tiny-sdxl": (build_tiny_sdxl, "random-weight tiny SDXL-like UNet (tests)", 32)}


def build_tiny_sdxl(seed: int = 0):
    """SDXL-like pipeline: two text encoders, text-time conditioning, 2 transformer layers at level 1."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny.vae(seed=seed), text_encoder=tiny.clip(seed=seed), text_encoder_2=tiny.clip(projection=True, seed=seed + 1),
        tokenizer=tiny.tiny_tokenizer(), tokenizer_2=tiny.tiny_tokenizer(), unet=tiny_unet(True, seed),
        scheduler=EulerDiscreteScheduler(),
    )
