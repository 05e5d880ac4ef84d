"""Tiny random-weight pipelines built offline from configs, for tests and quick tries.

Each ``build_tiny_*`` returns a real diffusers pipeline whose components are a few hundred
kilobytes of seeded random weights, assembled without touching the Hub: a word-level tokenizer
built locally, tiny CLIP/T5 text encoders, a tiny ``AutoencoderKL`` (2x downsampling) and the
denoiser. Their attention is meaningless (random weights); they exist to exercise code paths.
Default resolutions give an 8×8 base token grid.
"""
from __future__ import annotations

import torch

VOCAB = (
    "a an the photo of cat dog coffee cup rocket astronaut grass gravel brick flower city sky "
    "red green blue small large on in with painting sunset mountain river tree house"
).split()


def tiny_tokenizer(max_length: int = 16):
    """A word-level tokenizer over :data:`VOCAB`, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "</s>", "<s>"]
    vocab = {tok: i for i, tok in enumerate(specials + VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="</s>",
        bos_token="<s>",
        model_max_length=max_length,
    )
    return fast


def _vocab_size() -> int:
    return len(VOCAB) + 4


def _clip(projection: bool = False, hidden: int = 32, proj: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        projection_dim=proj,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=2,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=_vocab_size(),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int = 4, seed: int = 0, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    ).eval()


def build_tiny_pixart(seed: int = 0):
    """PixArt-Σ-like pipeline: 4 blocks, 2 heads × 16, patch 2; 32 px → 8×8 tokens."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=4,
        patch_size=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=32,
        caption_channels=32,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    return PixArtSigmaPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=_t5(32, seed),
        vae=_vae(seed=seed),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _unet(xl: bool, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kw = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    if xl:
        kw.update(
            cross_attention_dim=64,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
        )
    else:
        kw.update(cross_attention_dim=32)
    return UNet2DConditionModel(**kw).eval()


def build_tiny_sd15(seed: int = 0):
    """SD1.5-like pipeline: UNet with self-attention at two levels; 32 px → 16×16 latent."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(seed=seed),
        text_encoder=_clip(seed=seed),
        tokenizer=tiny_tokenizer(),
        unet=_unet(False, seed),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl(seed: int = 0):
    """SDXL-like pipeline: two text encoders, text-time conditioning, 2 transformer layers at level 1."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=_vae(seed=seed),
        text_encoder=_clip(seed=seed),
        text_encoder_2=_clip(projection=True, seed=seed + 1),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=_unet(True, seed),
        scheduler=EulerDiscreteScheduler(),
    )


def build_tiny_dit(seed: int = 0):
    """DiT-like class-conditional pipeline over 8 labels; 32 px → 8×8 tokens."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=1000,  # DiTPipeline hard-codes 1000 as the null class
    ).eval()
    labels = {i: name for i, name in enumerate(["cat", "dog", "coffee", "rocket", "grass", "brick", "flower", "sky"])}
    return DiTPipeline(transformer=transformer, vae=_vae(seed=seed), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), id2label=labels)


def build_tiny_flux(seed: int = 0):
    """FLUX-like pipeline: 1 double- and 2 single-stream blocks; 64 px → 16×16 latent → 8×8 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(seed=seed, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip(seed=seed),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_t5(32, seed),
        tokenizer_2=tiny_tokenizer(),
        transformer=transformer,
    )


def build_tiny_sd3(seed: int = 0):
    """SD3-like pipeline: 2 joint blocks, patch 2; 32 px → 8×8 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(seed=seed, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=_clip(projection=True, seed=seed),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=_clip(projection=True, seed=seed + 1),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=_t5(64, seed),
        tokenizer_3=tiny_tokenizer(),
    )


BUILDERS = {
    "tiny-pixart": (build_tiny_pixart, 32),
    "tiny-sd15": (build_tiny_sd15, 32),
    "tiny-sdxl": (build_tiny_sdxl, 32),
    "tiny-dit": (build_tiny_dit, 32),
    "tiny-flux": (build_tiny_flux, 32),
    "tiny-sd3": (build_tiny_sd3, 32),
}
