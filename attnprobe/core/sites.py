"""Self-attention sites: where a layer lives, what users call it, and its token grid.

A :class:`AttnSite` is one self-attention module of a denoiser, found by its family's adapter
(:meth:`attnprobe.core.family.Family.self_attention`). The token grid of a site is the base grid
of the denoiser (latent / patch for transformers, the latent itself for UNets) halved ``level``
times: :func:`halve_grid` is the one place that knows how a side shrinks (ceil, like a stride-2
convolution with padding 1 and like 2×2 pooling in ceil mode).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from attnprobe.core.errors import UserError

__all__ = ["AttnSite", "UnsupportedModelError", "halve_grid", "select_sites"]


class UnsupportedModelError(UserError):
    """The denoiser or pipeline is not one of the supported families."""


def halve_grid(grid: tuple[int, int], times: int = 1) -> tuple[int, int]:
    """(H, W) after ``times`` halvings, each side rounded up: 7 → 4 → 2 → 1."""
    h, w = (int(v) for v in grid)
    for _ in range(int(times)):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


@dataclass
class AttnSite:
    """One self-attention module.

    * ``name``: qualified module name (``transformer_blocks.3.attn1``);
    * ``label``: the name users know (``block 3``, ``down.1.0.attn1``);
    * ``family``: the adapter's name (``pixart``, ``unet``, ``sdxl``, ``dit``, ``flux``, ``sd3``, ...);
    * ``level``: how many times the base token grid is halved for this site (UNet levels);
    * ``joint``: for joint attention, where the image tokens sit in the concatenated sequence
      (``"image_last"``: text first, as in FLUX; ``"image_first"``: as in SD3), else ``None``.
    """

    name: str
    label: str
    family: str
    level: int = 0
    joint: str | None = None
    module: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    def grid(self, base: tuple[int, int]) -> tuple[int, int]:
        """Token grid (H', W') of this site given the denoiser's base grid."""
        return halve_grid(base, self.level)


def select_sites(sites: list[AttnSite], layers: str | None, option: str = "--layers") -> list[AttnSite]:
    """Filter sites by a comma-separated list of regular expressions on the name or label (errors name ``option``)."""
    if not layers:
        return sites
    try:
        pats = [re.compile(p.strip()) for p in layers.split(",") if p.strip()]
    except re.error as exc:
        raise ValueError(f"{option} {layers!r} is not a valid regular expression: {exc}") from None
    chosen = [s for s in sites if any(p.search(s.name) or p.search(s.label) for p in pats)]
    if not chosen:
        names = ", ".join(s.label for s in sites[:8]) + (" ..." if len(sites) > 8 else "")
        raise ValueError(f"{option} {layers!r} matches no self-attention layer (layers: {names})")
    return chosen
