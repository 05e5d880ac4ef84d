"""DiT (``DiTTransformer2DModel``): class-conditional, fixed resolution.

Self-attention: ``transformer_blocks.<i>.attn1`` on latent / patch tokens. "Prompts" are class
labels: names from the pipeline's ``id2label`` or integer class ids; the null class for
classifier-free guidance is 1000 (what ``DiTPipeline`` uses). The model only generates at the
resolution it was trained at, and ``DiTTransformer2DModel`` has no ``set_attn_processor``
(processors are set per module).
"""
from __future__ import annotations

import re

import torch

from attnprobe.core import tiny
from attnprobe.core.family import Alias, Family
from attnprobe.core.sites import AttnSite

NULL_CLASS = 1000


class DiT(Family):
    name = "dit"
    denoiser_classes = ("DiTTransformer2DModel",)
    pipeline_classes = ("DiTPipeline",)
    returns_latents = False
    class_conditional = True
    cfg_cond_first = True  # DiTPipeline: class labels then the null class
    aliases = (Alias("dit", "facebook/DiT-XL-2-256", "DiTPipeline", 256, "DiT-XL/2, class-conditional ImageNet 256"),)

    def self_attention(self, denoiser) -> list[AttnSite]:
        return [AttnSite(f"transformer_blocks.{i}.attn1", f"block {i}", self.name, module=b.attn1)
                for i, b in enumerate(denoiser.transformer_blocks)]

    def residual_tap(self, site) -> str:
        return site.name.rsplit(".", 1)[0] + ".norm3"  # no cross-attention: norm3(residual) → feed-forward

    def check_resolution(self, config, vae_factor, height, width) -> None:
        super().check_resolution(config, vae_factor, height, width)
        native = self.default_resolution(config, vae_factor)
        if (height, width) != (native, native):
            raise ValueError(f"DiT generates only at its trained resolution {native}x{native}; got {height}x{width}")

    @staticmethod
    def class_labels(pipe, prompts) -> list[int]:
        """Class ids for prompts that are label names (``pipe.labels``) or integers."""
        labels = getattr(pipe, "labels", None) or {}
        n_classes = int(pipe.transformer.config.num_embeds_ada_norm or 1000)
        ids = []
        for p in prompts:
            p = str(p).strip()
            if re.fullmatch(r"\d+", p):
                ids.append(int(p))
            elif p in labels:
                ids.append(int(labels[p]))
            else:
                known = ", ".join(list(labels)[:8]) or "integer class ids"
                raise ValueError(f"DiT prompts must be class labels or ids; {p!r} is not one (e.g. {known})")
            if not 0 <= ids[-1] < n_classes:
                raise ValueError(f"class id {ids[-1]} is out of range [0, {n_classes})")
        return ids

    def call_kwargs(self, pipe, prompts, *, height, width) -> dict:
        return {"class_labels": self.class_labels(pipe, prompts)}

    def encode_conditions(self, pipe, prompts, resolution) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.tensor(self.class_labels(pipe, prompts), dtype=torch.long)}

    def null_condition(self, pipe, resolution) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.tensor(NULL_CLASS, dtype=torch.long)}

    def random_inputs(self, denoiser, resolution, vae_factor, *, text_len, device, dtype, batch=1, seed=0) -> dict:
        cfg = denoiser.config
        lat = resolution // vae_factor
        g = torch.Generator("cpu").manual_seed(seed)
        return {"hidden_states": torch.randn(batch, cfg.in_channels, lat, lat, generator=g).to(device, dtype),
                "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
                "class_labels": torch.zeros(batch, device=device, dtype=torch.long), "return_dict": False}

    def tiny_builders(self):
        return {"tiny-dit": (build_tiny_dit, "random-weight tiny DiT (tests)", 32)}


def build_tiny_dit(seed: int = 0):
    """DiT-like class-conditional pipeline over 8 labels; 32 px → 8×8 tokens."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4, sample_size=16,
        patch_size=2, num_embeds_ada_norm=1000,  # DiTPipeline hard-codes 1000 as the null class
    ).eval()
    labels = dict(enumerate(["cat", "dog", "coffee", "rocket", "grass", "brick", "flower", "sky"]))
    return DiTPipeline(transformer=transformer, vae=tiny.vae(seed=seed),
                       scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), id2label=labels)
