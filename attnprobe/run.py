"""Calling any supported pipeline the same way: one image per prompt, fixed seed, known size.

Shared by ``attnprobe analyze`` and ``deltadistill`` (generation and teacher sampling), so that
every architecture's quirks live in one place: PixArt's resolution binning is turned off (the
token grid must be the one asked for), short word-level tokenizers cap ``max_sequence_length``,
DiT takes class labels instead of prompts and has a fixed resolution.
"""
from __future__ import annotations

import torch

from attnprobe.arch import base_grid, default_resolution, denoiser_of, detect_arch, vae_scale_factor

_SEQ_LEN_DEFAULTS = {"pixart": 300, "flux": 512, "sd3": 256}


def resolve_resolution(pipe, resolution) -> tuple[int, int]:
    """(height, width) in pixels from an int, 'HxW', (h, w) or None (the model's default)."""
    den = denoiser_of(pipe)
    arch = detect_arch(den)
    vf = vae_scale_factor(pipe)
    if resolution in (None, "", 0):
        size = getattr(pipe, "_attnprobe_resolution", None) or default_resolution(arch, den.config, vf)
        h = w = int(size)
    elif isinstance(resolution, (tuple, list)):
        h, w = (int(v) for v in resolution)
    else:
        text = str(resolution).lower()
        if "x" in text:
            h, w = (int(v) for v in text.split("x", 1))
        else:
            h = w = int(text)
    base_grid(arch, den.config, vf, h, w)  # raises if not divisible
    if arch == "dit":
        native = default_resolution(arch, den.config, vf)
        if (h, w) != (native, native):
            raise ValueError(f"DiT generates only at its trained resolution {native}x{native}; got {h}x{w}")
    return h, w


def pipeline_kwargs(pipe, prompt: str, *, height: int, width: int, steps: int, guidance_scale, generator, output_type="pil"):
    """Keyword arguments for one ``pipe(...)`` call of any supported architecture."""
    arch = detect_arch(denoiser_of(pipe))
    kw: dict = dict(num_inference_steps=steps, generator=generator, output_type=output_type)
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    if arch == "dit":
        try:
            kw["class_labels"] = pipe.get_label_ids([prompt])
        except (ValueError, KeyError, AttributeError):
            raise ValueError(f"DiT prompts must be class labels (e.g. {next(iter(pipe.labels), 'cat')!r}); got {prompt!r}") from None
        return kw
    kw.update(prompt=prompt, height=height, width=width)
    if arch == "pixart":
        kw.update(use_resolution_binning=False, clean_caption=False)
    if arch in _SEQ_LEN_DEFAULTS:
        tok = getattr(pipe, "tokenizer_3", None) if arch == "sd3" else getattr(pipe, "tokenizer_2", None) if arch == "flux" else pipe.tokenizer
        limit = getattr(tok, "model_max_length", None) or _SEQ_LEN_DEFAULTS[arch]
        kw["max_sequence_length"] = int(min(limit, _SEQ_LEN_DEFAULTS[arch]))
    return kw


def generate_one(pipe, prompt: str, *, height: int, width: int, steps: int, guidance_scale=None, seed: int = 0, output_type="pil"):
    """One sample for ``prompt`` with a CPU generator seeded by ``seed`` (reproducible on any device)."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    kw = pipeline_kwargs(pipe, prompt, height=height, width=width, steps=steps, guidance_scale=guidance_scale, generator=gen, output_type=output_type)
    return pipe(**kw).images[0]
