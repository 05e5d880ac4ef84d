"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint attention, image tokens first.

Sites: ``transformer_blocks.<i>.attn`` ("block i"), the joint attention over [image, text], analysed
on its image→image block; SD3.5's dual-attention blocks add an image-only ``attn2``
("block i (self)"). Joint attention carries the prompt, so SD3 is not convertible.
"""
from __future__ import annotations

import torch

from attnprobe.core import tiny
from attnprobe.core.family import Alias, Family, QueryKey
from attnprobe.core.sites import AttnSite


class SD3(Family):
    name = "sd3"
    denoiser_classes = ("SD3Transformer2DModel",)
    pipeline_classes = ("StableDiffusion3Pipeline",)
    convertible = False
    not_convertible_reason = "joint attention"
    text_tokens = 333
    tiny_text_tokens = 32  # the CLIP pair's tokens, then T5's
    max_sequence_length = 256
    aliases = (Alias("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline", 1024,
                     "SD3 medium (joint attention; analysed on the image-image block)"),)

    def self_attention(self, denoiser) -> list[AttnSite]:
        sites = []
        for i, block in enumerate(denoiser.transformer_blocks):
            sites.append(AttnSite(f"transformer_blocks.{i}.attn", f"block {i}", self.name, joint="image_first", module=block.attn))
            if getattr(block, "attn2", None) is not None:  # SD3.5 dual attention: image-only self-attention
                sites.append(AttnSite(f"transformer_blocks.{i}.attn2", f"block {i} (self)", self.name, module=block.attn2))
        return sites

    def query_key(self, site, attn, call) -> QueryKey:
        x, ctx = call["hidden_states"], call.get("encoder_hidden_states")
        b = x.shape[0]
        q, k = attn.to_q(x), attn.to_k(x)
        d = k.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, d).transpose(1, 2)  # [B, heads, N, d]
        k = k.view(b, -1, attn.heads, d).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if ctx is not None:
            cq = attn.add_q_proj(ctx).view(b, -1, attn.heads, d).transpose(1, 2)
            ck = attn.add_k_proj(ctx).view(b, -1, attn.heads, d).transpose(1, 2)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2)  # image first
        return QueryKey(q, k, None)

    def sequence_length(self, pipe) -> int:
        tok = getattr(pipe, "tokenizer_3", None)
        limit = getattr(tok, "model_max_length", None)
        return min(256, int(limit)) if isinstance(limit, int) and 0 < limit < 100_000 else 256

    def random_inputs(self, denoiser, resolution, vae_factor, *, text_len, device, dtype, batch=1, seed=0) -> dict:
        cfg = denoiser.config
        lat = resolution // vae_factor
        g = torch.Generator("cpu").manual_seed(seed)
        return {"hidden_states": torch.randn(batch, cfg.in_channels, lat, lat, generator=g).to(device, dtype),
                "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
                "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
                "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype), "return_dict": False}

    def tiny_builders(self):
        return {"tiny-sd3": (build_tiny_sd3, "random-weight tiny SD3 (tests)", 32)}


def build_tiny_sd3(seed: int = 0):
    """SD3-like pipeline: 2 joint blocks, patch 2; 32 px → 8×8 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny.vae(seed=seed, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=tiny.clip(projection=True, seed=seed), tokenizer=tiny.tiny_tokenizer(),
        text_encoder_2=tiny.clip(projection=True, seed=seed + 1), tokenizer_2=tiny.tiny_tokenizer(),
        text_encoder_3=tiny.t5(64, seed), tokenizer_3=tiny.tiny_tokenizer(),
    )
