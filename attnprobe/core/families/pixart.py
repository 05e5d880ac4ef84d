"""PixArt-Σ / PixArt-α (``PixArtTransformer2DModel``), and the shipped demo model.

Self-attention: ``transformer_blocks.<i>.attn1`` ("block i"), on latent / patch tokens. The host
block wraps it in adaLN-single shift/scale/gate; cross-attention (``attn2``) is never touched.
Pipelines are called with resolution binning off (the token grid must be the one asked for) and
``max_sequence_length`` capped by the tokenizer (300 for T5, 16 for the tiny tokenizer).
"""
from __future__ import annotations

from pathlib import Path

import math

import torch

from attnprobe.core import tiny
from attnprobe.core.family import Alias, Family
from attnprobe.core.sites import AttnSite

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo" / "pipeline"  # attnprobe/demo/pipeline (data only)
DEMO_RESOLUTION = 256


class PixArt(Family):
    name = "pixart"
    denoiser_classes = ("PixArtTransformer2DModel",)
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    text_tokens = 300
    max_sequence_length = 300
    aliases = (
        Alias("pixart", "PixArt-alpha/PixArt-Sigma-XL-2-512-MS", "PixArtSigmaPipeline", 512,
              "PixArt-Σ XL/2 at 512 px (28 blocks, 1152 ch)"),
        Alias("pixart-1024", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArtSigmaPipeline", 1024, "PixArt-Σ XL/2 at 1024 px"),
        Alias("pixart-alpha", "PixArt-alpha/PixArt-XL-2-1024-MS", "PixArtAlphaPipeline", 1024, "PixArt-α XL/2 at 1024 px",
              text_tokens=120),
        Alias("demo", str(DEMO_DIR), "PixArtSigmaPipeline", DEMO_RESOLUTION,
              "small trained PixArt-family model shipped with the package (runs on CPU)"),
    )

    paper_block = {"gate": "sigmoid", "gate_scale": None, "pool": "adaptive", "dw_bias": False}

    def paper_kernel_size(self, site) -> int:
        return 13  # official PixArt-Σ: K = 13 in every block

    def residual_tap(self, site) -> str:
        return site.name.rsplit(".", 1)[0] + ".attn2"  # PixArt feeds the raw residual stream to cross-attention

    def self_attention(self, denoiser) -> list[AttnSite]:
        return [AttnSite(f"transformer_blocks.{i}.attn1", f"block {i}", self.name, module=b.attn1)
                for i, b in enumerate(denoiser.transformer_blocks)]

    def call_kwargs(self, pipe, prompts, *, height, width) -> dict:
        kw = super().call_kwargs(pipe, prompts, height=height, width=width)
        kw.update(use_resolution_binning=False, clean_caption=False)
        return kw

    def encode_conditions(self, pipe, prompts, resolution) -> dict[str, torch.Tensor]:
        device = getattr(pipe, "_execution_device", "cpu")
        emb, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=device,
                                             clean_caption=False, max_sequence_length=self.sequence_length(pipe))
        return {"encoder_hidden_states": emb.detach().cpu(), "encoder_attention_mask": mask.detach().cpu()}

    def finish_conditions(self, cond: dict, null: dict) -> None:
        """Drop trailing token positions that are padding in every caption (masked out anyway)."""
        n = _used_length(torch.cat([cond["encoder_attention_mask"], null["encoder_attention_mask"][None]]))
        for d in (cond, null):
            d["encoder_hidden_states"] = d["encoder_hidden_states"][..., :n, :].contiguous()
            d["encoder_attention_mask"] = d["encoder_attention_mask"][..., :n].contiguous()

    def trim_text(self, kwargs: dict) -> None:
        """The same for recorded calls: the mask turns padding into a -10000 bias, whose softmax weight is exactly 0,
        so the outputs do not change (the demo's captions use 7 of T5's 300 positions)."""
        mask = kwargs.get("encoder_attention_mask")
        if mask is None or mask.ndim != 2 or "encoder_hidden_states" not in kwargs:
            return
        n = _used_length(mask)
        kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, :n].contiguous()
        kwargs["encoder_attention_mask"] = mask[:, :n].contiguous()

    def denoiser_kwargs(self, denoiser, cond, resolution) -> dict:
        emb = cond["encoder_hidden_states"]  # [B, L, D]
        b = emb.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if getattr(denoiser, "use_additional_conditions", False):
            added = {"resolution": torch.tensor([[resolution, resolution]] * b, device=emb.device, dtype=emb.dtype),  # [B, 2]
                     "aspect_ratio": torch.ones(b, 1, device=emb.device, dtype=emb.dtype)}  # [B, 1]
        out = {"encoder_hidden_states": emb, "added_cond_kwargs": added}
        if "encoder_attention_mask" in cond:
            out["encoder_attention_mask"] = cond["encoder_attention_mask"]  # [B, L]
        return out

    def random_inputs(self, denoiser, resolution, vae_factor, *, text_len, device, dtype, batch=1, seed=0) -> dict:
        cfg = denoiser.config
        lat = resolution // vae_factor
        g = torch.Generator("cpu").manual_seed(seed)
        cond = {"encoder_hidden_states": torch.randn(batch, text_len, cfg.caption_channels, generator=g).to(device, dtype),
                "encoder_attention_mask": torch.ones(batch, text_len, device=device, dtype=torch.long)}  # as the pipeline's
        return {"hidden_states": torch.randn(batch, cfg.in_channels, lat, lat, generator=g).to(device, dtype),
                "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
                **self.denoiser_kwargs(denoiser, cond, resolution), "return_dict": False}

    def tiny_builders(self):
        return {"tiny-pixart": (build_tiny_pixart, "random-weight tiny PixArt-Σ (tests)", 32)}

    def random_pipeline(self, denoiser, vae_factor: int):
        """Real-size transformer; a 1-layer T5 of width caption_channels (narrow MLP) and a tiny VAE."""
        from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

        cfg = denoiser.config
        levels = int(round(math.log2(vae_factor))) + 1
        return PixArtSigmaPipeline(
            tokenizer=tiny.tiny_tokenizer(), text_encoder=tiny.t5(int(cfg.caption_channels), d_ff=64, layers=1),
            vae=tiny.vae(latent_channels=int(cfg.in_channels), levels=levels), transformer=denoiser,
            scheduler=DPMSolverMultistepScheduler())


def _used_length(masks: torch.Tensor) -> int:
    """1 + the last position any row of ``masks`` [B, L] keeps (at least 1)."""
    used = masks.sum(0) > 0
    return max(1, int(used.nonzero().max()) + 1) if bool(used.any()) else 1


def build_tiny_pixart(seed: int = 0):
    """PixArt-Σ-like pipeline: 4 blocks, 2 heads × 16, patch 2; 32 px → 8×8 tokens."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=4, patch_size=2, attention_head_dim=16, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=32, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    return PixArtSigmaPipeline(tokenizer=tiny.tiny_tokenizer(), text_encoder=tiny.t5(32, seed), vae=tiny.vae(seed=seed),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
