"""HunyuanDiT (``HunyuanDiT2DModel``): a DiT with rotary position embeddings and long skips.

Self-attention: ``blocks.<i>.attn1`` ("block i") on latent / patch tokens; queries and keys get a
2-D rotary embedding (``image_rotary_emb``, computed by the pipeline from the token grid) after
their norms. Blocks in the second half also take a long skip connection from the first half,
which does not concern the attention. Conditions come from two text encoders (BERT and mT5). The
pipeline hard-codes an 8× VAE, and resolution binning is turned off so the grid is the one asked
for.
"""
from __future__ import annotations

import torch

from attnprobe.core import tiny
from attnprobe.core.family import Alias, Family, QueryKey, attention_query_key
from attnprobe.core.sites import AttnSite


class HunyuanDiT(Family):
    name = "hunyuan"
    attention_equivariant = False  # 2-D rotary embeddings on q and k
    denoiser_classes = ("HunyuanDiT2DModel",)
    pipeline_classes = ("HunyuanDiTPipeline",)
    text_tokens = 77
    aliases = (Alias("hunyuan", "Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers", "HunyuanDiTPipeline", 1024,
                     "HunyuanDiT v1.2 (rotary self-attention, long skips)"),)

    def self_attention(self, denoiser) -> list[AttnSite]:
        return [AttnSite(f"blocks.{i}.attn1", f"block {i}", self.name, module=b.attn1) for i, b in enumerate(denoiser.blocks)]

    def residual_tap(self, site) -> str:
        return site.name.rsplit(".", 1)[0] + ".norm2"  # hidden + attn1(...) → norm2 → cross-attention

    def query_key(self, site, attn, call) -> QueryKey:
        return attention_query_key(attn, call["hidden_states"], call.get("attention_mask"), rotary=call.get("image_rotary_emb"))

    def call_kwargs(self, pipe, prompts, *, height, width) -> dict:
        return {"prompt": list(prompts), "height": int(height), "width": int(width), "use_resolution_binning": False}

    # -- training and benchmarks: the keyword arguments the pipeline builds for each call ------------------
    @staticmethod
    def rotary(denoiser, resolution: int, vae_factor: int = 8, device="cpu"):
        """The 2-D rotary embedding of a square ``resolution`` image, as the pipeline builds it."""
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

        p = int(denoiser.config.patch_size)
        side = resolution // vae_factor // p
        crops = get_resize_crop_region_for_grid((side, side), 512 // 8 // p)
        return get_2d_rotary_pos_embed(denoiser.inner_dim // denoiser.num_heads, crops, (side, side), device=device,
                                       output_type="pt")

    def encode_conditions(self, pipe, prompts, resolution) -> dict[str, torch.Tensor]:
        device = getattr(pipe, "_execution_device", "cpu")
        out = {}
        for index, suffix in ((0, ""), (1, "_t5")):
            emb, _, mask, _ = pipe.encode_prompt(list(prompts), device=device, dtype=pipe.transformer.dtype,
                                                 do_classifier_free_guidance=False, text_encoder_index=index)
            out[f"encoder_hidden_states{suffix}"] = emb.detach().cpu()  # [M, L, D]
            out[f"text_embedding_mask{suffix}"] = mask.detach().cpu()  # [M, L]
        return out

    def denoiser_kwargs(self, denoiser, cond, resolution) -> dict:
        emb = cond["encoder_hidden_states"]
        b = emb.shape[0]
        meta = torch.tensor([[resolution, resolution, resolution, resolution, 0, 0]] * b, device=emb.device, dtype=emb.dtype)
        return {**cond, "image_meta_size": meta, "style": torch.zeros(b, device=emb.device, dtype=torch.long),
                "image_rotary_emb": self.rotary(denoiser, resolution, device=emb.device)}

    def random_inputs(self, denoiser, resolution, vae_factor, *, text_len, device, dtype, batch=1, seed=0) -> dict:
        cfg = denoiser.config
        lat = resolution // vae_factor
        g = torch.Generator("cpu").manual_seed(seed)
        cond = {"encoder_hidden_states": torch.randn(batch, cfg.text_len, cfg.cross_attention_dim, generator=g).to(device, dtype),
                "text_embedding_mask": torch.ones(batch, cfg.text_len, device=device, dtype=torch.long),
                "encoder_hidden_states_t5": torch.randn(batch, cfg.text_len_t5, cfg.cross_attention_dim_t5,
                                                        generator=g).to(device, dtype),
                "text_embedding_mask_t5": torch.ones(batch, cfg.text_len_t5, device=device, dtype=torch.long)}
        return {"hidden_states": torch.randn(batch, cfg.in_channels, lat, lat, generator=g).to(device, dtype),
                "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
                **self.denoiser_kwargs(denoiser, cond, resolution), "return_dict": False}

    def tiny_builders(self):
        return {"tiny-hunyuan": (build_tiny_hunyuan, "random-weight tiny HunyuanDiT (tests)", 128)}


def build_tiny_hunyuan(seed: int = 0):
    """HunyuanDiT-like pipeline: 4 blocks (2 with long skips), 2 heads × 16, patch 2; 128 px → 8×8 tokens.

    The pipeline assumes an 8× VAE, so the tiny VAE has four levels; the text lengths (77 BERT,
    256 mT5 tokens) are the pipeline's own.
    """
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(seed)
    transformer = HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=16, hidden_size=32,
        num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32, cross_attention_dim_t5=32,
        pooled_projection_dim=16, text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False,
    ).eval()
    return HunyuanDiTPipeline(
        vae=tiny.vae(seed=seed, levels=4), text_encoder=tiny.bert(seed=seed), tokenizer=tiny.tiny_tokenizer(),
        transformer=transformer, scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, text_encoder_2=tiny.t5(32, seed), tokenizer_2=tiny.tiny_tokenizer(),
    )
