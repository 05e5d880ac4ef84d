"""Tiny random-weight pipeline components built offline, for tests and quick tries.

Each family adapter (:mod:`attnprobe.core.families`) builds its ``tiny-*`` pipeline from these
parts: a word-level tokenizer built locally, tiny CLIP/T5/BERT text encoders and a tiny
``AutoencoderKL`` (2x downsampling, or 8x for pipelines that hard-code it), plus its own small
denoiser — a few hundred kilobytes of seeded random weights, assembled without touching the Hub.
Their attention is meaningless (random weights); they exist to exercise code paths. Default
resolutions give an 8×8 base token grid.
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


def vocab_size() -> int:
    return len(VOCAB) + 4


def clip(projection: bool = False, hidden: int = 32, proj: int = 32, seed: int = 0, intermediate: int | None = None,
         layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
        projection_dim=proj,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=2,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5(d_model: int = 32, seed: int = 0, d_ff: int | None = None, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size(),
        d_model=d_model,
        d_kv=8,
        d_ff=d_ff or 2 * d_model,
        num_layers=layers,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def vae(latent_channels: int = 4, seed: int = 0, levels: int = 2, **extra):
    """A tiny ``AutoencoderKL`` with 2^(levels−1)× downsampling."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(8, 16, 16, 16)[:levels] if levels > 2 else (8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **extra,
    ).eval()


def bert(hidden: int = 32, max_positions: int = 80, seed: int = 0):
    """A tiny BERT text encoder (HunyuanDiT's first encoder)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size(), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=max_positions, pad_token_id=0)
    return BertModel(cfg).eval()
