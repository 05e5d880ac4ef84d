"""Running any supported pipeline the same way: a batch of (prompt, seed) pairs at a known size.

Shared by ``attnprobe analyze`` and every ``deltadistill`` command (teacher sampling, generation,
evaluation). What differs per family (PixArt's resolution binning off, prompt-length caps, DiT's
class labels, DiT's fixed resolution) comes from the family adapter's
:meth:`~attnprobe.core.family.Family.call_kwargs` and :meth:`~attnprobe.core.family.Family.check_resolution`.
Each image gets its own CPU generator seeded by its seed, so results do not depend on the batch
size or the device.
"""
from __future__ import annotations

import torch

from attnprobe.core.family import denoiser_of, family_of, vae_scale_factor

__all__ = ["resolve_resolution", "parse_resolution", "MAX_SIDE", "sample", "generate_one"]


MAX_SIDE = 16384  # pixels per side; far beyond any model's training size


def parse_resolution(resolution) -> tuple[int, int]:
    """(height, width) from an int, 'N', 'HxW' or (h, w); ValueError for anything else or non-positive sides."""
    if isinstance(resolution, (tuple, list)):
        h, w = (int(v) for v in resolution)
    else:
        text = str(resolution).lower().strip()
        try:
            h, w = (int(v) for v in text.split("x", 1)) if "x" in text else (int(text),) * 2
        except ValueError:
            raise ValueError(f"bad resolution {resolution!r}: use N or HxW in pixels") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution {resolution!r} must be positive")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise ValueError(f"resolution {h}x{w}: at most {MAX_SIDE} px per side")
    return h, w


def resolve_resolution(pipe, resolution=None) -> tuple[int, int]:
    """(height, width) in pixels from an int, 'HxW', (h, w) or None (the model's default); validated."""
    den = denoiser_of(pipe)
    fam = family_of(den)
    vf = vae_scale_factor(pipe)
    if resolution in (None, "", 0):
        size = getattr(pipe, "_attnprobe_resolution", None) or fam.default_resolution(den.config, vf)
        h = w = int(size)
    else:
        h, w = parse_resolution(resolution)
    fam.check_resolution(den.config, vf, h, w)
    return h, w


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], *, steps: int = 20, resolution=None, guidance: float | None = None,
           output_type: str = "pil"):
    """Run ``pipe`` once for the batch of (prompt, seed) pairs; returns the pipeline's ``images``.

    ``output_type="latent"`` returns model-space latents [B, C, h, w]; families whose pipeline
    cannot (DiT) raise ValueError.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    fam = family_of(denoiser_of(pipe))
    if output_type == "latent" and not fam.returns_latents:
        raise ValueError(f"{fam.name} pipelines cannot return latents; sample images and encode them instead")
    h, w = resolve_resolution(pipe, resolution)
    kw = fam.call_kwargs(pipe, list(prompts), height=h, width=w)
    kw.update(num_inference_steps=int(steps), output_type=output_type,
              generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds])
    if guidance is not None:
        kw["guidance_scale"] = float(guidance)
    return pipe(**kw).images


def generate_one(pipe, prompt: str, *, height: int, width: int, steps: int, guidance_scale=None, seed: int = 0,
                 output_type="pil"):
    """One sample for ``prompt`` at height × width with a CPU generator seeded by ``seed``."""
    return sample(pipe, [prompt], [seed], steps=steps, resolution=(height, width), guidance=guidance_scale,
                  output_type=output_type)[0]
