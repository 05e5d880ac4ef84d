"""FLUX (``FluxTransformer2DModel``): joint text/image attention, 2×2-packed latent tokens.

Sites: ``transformer_blocks.<i>.attn`` ("double i", text and image streams projected separately,
then concatenated text first) and ``single_transformer_blocks.<i>.attn`` ("single i", one stream
that already holds [text, image]). Both are analysed on their image→image block: the softmax runs
over all keys, only image keys are binned. The token grid comes from ``img_ids`` (row, column
ids); an image side must be divisible by vae · 2. Joint attention carries the prompt, so it is
not convertible.
"""
from __future__ import annotations

import torch

from attnprobe.core import tiny
from attnprobe.core.family import Alias, Family, QueryKey
from attnprobe.core.sites import AttnSite


class Flux(Family):
    name = "flux"
    attention_equivariant = False  # rotary embeddings on q and k
    denoiser_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline",)
    convertible = False
    not_convertible_reason = "joint attention"
    text_tokens = 512
    max_sequence_length = 512
    aliases = (Alias("flux", "black-forest-labs/FLUX.1-dev", "FluxPipeline", 1024,
                     "FLUX.1-dev (joint attention; analysed on the image-image block)"),)

    def self_attention(self, denoiser) -> list[AttnSite]:
        sites = [AttnSite(f"transformer_blocks.{i}.attn", f"double {i}", self.name, joint="image_last", module=b.attn)
                 for i, b in enumerate(denoiser.transformer_blocks)]
        sites += [AttnSite(f"single_transformer_blocks.{i}.attn", f"single {i}", self.name, joint="image_last", module=b.attn)
                  for i, b in enumerate(denoiser.single_transformer_blocks)]
        return sites

    def patch(self, config) -> int:
        return 2  # 2×2 latent packing

    def default_resolution(self, config, vae_factor) -> int:
        size = config.sample_size if hasattr(config, "sample_size") else None
        return 1024 if size is None else int(size) * vae_factor

    def grid_from_call(self, denoiser, args, kwargs):
        ids = kwargs.get("img_ids")
        if ids is None:
            raise RuntimeError("FLUX capture needs img_ids to know the token grid")
        ids = ids[0] if ids.dim() == 3 else ids  # [N, 3]: (0, row, column)
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def query_key(self, site, attn, call) -> QueryKey:
        from diffusers.models.embeddings import apply_rotary_emb

        x, ctx = call["hidden_states"], call.get("encoder_hidden_states")
        d = attn.head_dim
        if getattr(attn, "fused_projections", False):
            q, k, _ = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k = attn.to_q(x), attn.to_k(x)
        q, k = attn.norm_q(q.unflatten(-1, (-1, d))), attn.norm_k(k.unflatten(-1, (-1, d)))  # [B, N, heads, d]
        if ctx is not None and attn.added_kv_proj_dim is not None:
            if getattr(attn, "fused_projections", False):
                cq, ck, _ = attn.to_added_qkv(ctx).chunk(3, dim=-1)
            else:
                cq, ck = attn.add_q_proj(ctx), attn.add_k_proj(ctx)
            cq, ck = attn.norm_added_q(cq.unflatten(-1, (-1, d))), attn.norm_added_k(ck.unflatten(-1, (-1, d)))
            q, k = torch.cat([cq, q], dim=1), torch.cat([ck, k], dim=1)  # text first
        rot = call.get("image_rotary_emb")
        if rot is not None:
            q = apply_rotary_emb(q, rot, sequence_dim=1)
            k = apply_rotary_emb(k, rot, sequence_dim=1)
        return QueryKey(q.transpose(1, 2), k.transpose(1, 2), call.get("attention_mask"))  # [B, heads, N, d]

    def sequence_length(self, pipe) -> int:
        tok = getattr(pipe, "tokenizer_2", None)
        limit = getattr(tok, "model_max_length", None)
        return min(512, int(limit)) if isinstance(limit, int) and 0 < limit < 100_000 else 512

    def random_inputs(self, denoiser, resolution, vae_factor, *, text_len, device, dtype, batch=1, seed=0) -> dict:
        cfg = denoiser.config
        side = resolution // vae_factor // 2  # 2×2 packing
        g = torch.Generator("cpu").manual_seed(seed)
        ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        img_ids = torch.cat([torch.zeros(side * side, 1), ids.float()], 1).to(device=device, dtype=dtype)  # [N, 3]
        kw = {"hidden_states": torch.randn(batch, side * side, cfg.in_channels, generator=g).to(device, dtype),  # [B, N, 64]
              "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g).to(device, dtype),
              "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(device, dtype),
              "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
              "img_ids": img_ids, "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype), "return_dict": False}
        if cfg.guidance_embeds:
            kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return kw

    def tiny_builders(self):
        return {"tiny-flux": (build_tiny_flux, "random-weight tiny FLUX (tests)", 32)}


def build_tiny_flux(seed: int = 0):
    """FLUX-like pipeline: 1 double- and 2 single-stream blocks; 64 px → 16×16 latent → 8×8 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny.vae(seed=seed, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=tiny.clip(seed=seed), tokenizer=tiny.tiny_tokenizer(), text_encoder_2=tiny.t5(32, seed),
        tokenizer_2=tiny.tiny_tokenizer(), transformer=transformer,
    )
