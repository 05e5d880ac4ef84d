"""What the bench measures on: a model's architecture (meta denoiser), its default resolutions,
and random inputs for one denoiser call (from the family adapter)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from deltadistill import flops as cost_model


REAL_DEFAULT_RESOLUTIONS = (512, 1024, 2048, 4096)


@dataclass
class _Model:
    name: str
    spec: object
    family: object  # the family adapter
    info: dict  # {"class", "vae_scale_factor", "resolution", "config"}
    meta: nn.Module  # denoiser on the meta device (shapes only)
    pipe: object = None  # loaded pipeline when weights/builders exist
    text_len: int = 77


def _load_model(name: str) -> _Model:
    """Architecture (meta denoiser) of ``name``; the pipeline is loaded only when no config is shipped."""
    from attnprobe.core import registry
    from attnprobe.core.family import denoiser_of, family_of, vae_scale_factor

    spec = registry.resolve(name)
    pipe = None
    if (registry.CONFIG_DIR / f"{spec.alias}.json").is_file():
        info = registry.architecture_config(name)
    else:  # tiny-*, demo, local folders: the config comes from the pipeline itself
        pipe, spec = registry.load_pipeline(name, dtype="fp32")
        den = denoiser_of(pipe)
        info = {"class": type(den).__name__, "vae_scale_factor": vae_scale_factor(pipe),
                "resolution": spec.resolution or 0,
                "config": {k: v for k, v in dict(den.config).items() if not k.startswith("_")}}
    import diffusers

    with torch.device("meta"):
        meta = getattr(diffusers, info["class"]).from_config(info["config"])
    family = family_of(meta)
    text_len = spec.text_tokens or family.text_tokens
    tok = getattr(pipe, "tokenizer", None) if pipe is not None else None
    if tok is not None and 0 < int(getattr(tok, "model_max_length", 0) or 0) <= 1024:
        text_len = int(tok.model_max_length)
    if not info.get("resolution"):
        info["resolution"] = family.default_resolution(meta.config, info["vae_scale_factor"])
    return _Model(name, spec, family, info, meta, pipe, text_len)


def default_resolutions(model: _Model) -> list[int]:
    """512…4096 for the real models' configs; native and 2× for tiny-*, demo and local folders."""
    from attnprobe.core import registry

    if (registry.CONFIG_DIR / f"{model.spec.alias}.json").is_file():
        return list(REAL_DEFAULT_RESOLUTIONS)
    r = int(model.info["resolution"])
    return [r, 2 * r]


def denoiser_inputs(model: _Model, resolution: int, device, dtype, batch: int = 1) -> dict:
    """Keyword arguments for one denoiser call at ``resolution`` px (random latents and conditions)."""
    return model.family.random_inputs(model.meta, resolution, int(model.info["vae_scale_factor"]),
                                      text_len=model.text_len, device=device, dtype=dtype, batch=batch)


def meta_step_flops(model: _Model, resolution: int) -> int:
    """Matmul/conv FLOPs of one denoiser call (FlopCounterMode on the meta device, no memory)."""
    kw = denoiser_inputs(model, resolution, "meta", torch.float32)
    return cost_model.count_measured(model.meta, kw)

