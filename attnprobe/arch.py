"""Where the self-attention of each supported diffusers architecture lives, and its token grid.

For a denoiser (``pipe.transformer`` or ``pipe.unet``) :func:`find_self_attention` returns one
:class:`AttnSite` per self-attention module, in forward order. A site knows

* ``name``: the qualified module name (``transformer_blocks.3.attn1``, ``down_blocks.1.attentions.0.transformer_blocks.0.attn1``);
* ``label``: the name users know (``block 3``, ``down.1.attn1``);
* ``level``: how many times its grid was halved relative to the base token grid (UNet levels);
* ``joint``: for joint attention (FLUX, SD3), where the image tokens sit in the concatenated
  sequence (``"image_last"``: text first, as in FLUX; ``"image_first"``: as in SD3), else ``None``.

The base token grid for an image of ``height × width`` pixels is ``latent / patch`` for
PixArt, DiT and SD3, ``latent / 2`` for FLUX (2×2 packing) and the latent itself for UNets.
Cross-attention (``attn2`` of UNet/PixArt/DiT blocks) is never a site.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

SUPPORTED = {
    "PixArtTransformer2DModel": "pixart",
    "UNet2DConditionModel": "unet",
    "DiTTransformer2DModel": "dit",
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
}
# Architectures whose self-attention deltadistill may replace (joint attention carries the text).
CONVERTIBLE = ("pixart", "unet", "dit")


class UnsupportedModelError(ValueError):
    """The denoiser is not one of the supported architectures."""


@dataclass
class AttnSite:
    name: str
    label: str
    arch: str
    level: int = 0
    joint: str | None = None
    module: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    def grid(self, base: tuple[int, int]) -> tuple[int, int]:
        """Token grid (H', W') of this site given the base grid; each UNet level halves (ceil)."""
        h, w = base
        for _ in range(self.level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w


def detect_arch(denoiser: torch.nn.Module) -> str:
    """Map a denoiser to its architecture key, or raise naming what is supported."""
    cls = type(denoiser).__name__
    if cls in SUPPORTED:
        return SUPPORTED[cls]
    for base in type(denoiser).__mro__:
        if base.__name__ in SUPPORTED:
            return SUPPORTED[base.__name__]
    names = ", ".join(sorted(SUPPORTED))
    raise UnsupportedModelError(f"unsupported denoiser {cls}; supported: {names}")


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoising network (``transformer`` or ``unet``)."""
    for attr in ("transformer", "unet"):
        net = getattr(pipe, attr, None)
        if isinstance(net, torch.nn.Module):
            return net
    raise UnsupportedModelError(
        f"{type(pipe).__name__} has no `transformer` or `unet`; supported denoisers: {', '.join(sorted(SUPPORTED))}"
    )


def _unet_level(name: str, n_down: int) -> tuple[int, str]:
    """Downsampling level and user-facing label of a UNet attn1 module."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$", name)
    if m:
        kind, b, a, t = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        level = b if kind == "down" else n_down - 1 - b
        suffix = f".{t}" if t else ""
        return level, f"{kind}.{b}.{a}{suffix}.attn1"
    m = re.match(r"mid_block\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn1$", name)
    if m:
        a, t = int(m.group(1)), int(m.group(2))
        suffix = f".{t}" if t else ""
        return n_down - 1, f"mid.{a}{suffix}.attn1"
    raise UnsupportedModelError(f"unexpected UNet self-attention module {name!r}")


def find_self_attention(denoiser: torch.nn.Module) -> list[AttnSite]:
    """All self-attention sites of a supported denoiser, in module order."""
    arch = detect_arch(denoiser)
    sites: list[AttnSite] = []
    if arch in ("pixart", "dit"):
        for i, block in enumerate(denoiser.transformer_blocks):
            sites.append(AttnSite(f"transformer_blocks.{i}.attn1", f"block {i}", arch, module=block.attn1))
    elif arch == "unet":
        n_down = len(denoiser.config.down_block_types)
        for name, mod in denoiser.named_modules():
            if name.endswith(".attn1"):
                level, label = _unet_level(name, n_down)
                sites.append(AttnSite(name, label, arch, level=level, module=mod))
    elif arch == "flux":
        for i, block in enumerate(denoiser.transformer_blocks):
            sites.append(AttnSite(f"transformer_blocks.{i}.attn", f"double {i}", arch, joint="image_last", module=block.attn))
        for i, block in enumerate(denoiser.single_transformer_blocks):
            sites.append(
                AttnSite(f"single_transformer_blocks.{i}.attn", f"single {i}", arch, joint="image_last", module=block.attn)
            )
    elif arch == "sd3":
        for i, block in enumerate(denoiser.transformer_blocks):
            sites.append(AttnSite(f"transformer_blocks.{i}.attn", f"block {i}", arch, joint="image_first", module=block.attn))
            if getattr(block, "attn2", None) is not None:  # SD3.5 dual attention: image-only self-attention
                sites.append(AttnSite(f"transformer_blocks.{i}.attn2", f"block {i} (self)", arch, module=block.attn2))
    if not sites:
        raise UnsupportedModelError(f"found no self-attention modules in {type(denoiser).__name__}")
    return sites


def vae_scale_factor(pipe) -> int:
    """Pixel → latent downsampling factor of the pipeline's VAE."""
    sf = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sf, int) and sf > 0:
        return sf
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise UnsupportedModelError(f"{type(pipe).__name__} has no VAE; cannot derive the token grid")
    return 2 ** (len(vae.config.block_out_channels) - 1)


def grid_divisor(arch: str, denoiser_config, vae_factor: int) -> int:
    """Pixels per base token along each side, times the extra factor the arch needs to divide."""
    if arch == "unet":
        return vae_factor * 2 ** (len(denoiser_config.down_block_types) - 1)
    if arch == "flux":
        return vae_factor * 2
    return vae_factor * int(denoiser_config.patch_size)


def base_grid(arch: str, denoiser_config, vae_factor: int, height: int, width: int) -> tuple[int, int]:
    """Base token grid (H', W') for an image of height × width pixels (validated divisibility)."""
    div = grid_divisor(arch, denoiser_config, vae_factor)
    if height % div or width % div or height <= 0 or width <= 0:
        raise ValueError(f"resolution {height}x{width} is not divisible by {div}, this model's downsampling")
    per_token = vae_factor if arch == "unet" else div
    return height // per_token, width // per_token


def default_resolution(arch: str, denoiser_config, vae_factor: int) -> int:
    """The resolution the model was configured for (sample_size × pixels per latent)."""
    size = denoiser_config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    if arch == "flux":
        return 1024 if size is None else int(size) * vae_factor
    return int(size) * vae_factor
