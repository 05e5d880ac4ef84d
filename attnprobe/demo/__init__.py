"""The demo model: a small, trained PixArt-family text-to-image model shipped with the package.

``attnprobe/demo/pipeline/`` is a diffusers ``PixArtSigmaPipeline`` folder (PixArt transformer,
its own small VAE, a tiny T5 text encoder and a word-level tokenizer) trained by
:mod:`attnprobe.demo.train` on photographs that ship with scikit-image and scikit-learn
(:mod:`attnprobe.demo.data`). It loads offline and samples in seconds on a CPU::

    from attnprobe.demo import load_demo_pipeline, DEMO_PROMPTS
    pipe = load_demo_pipeline()
    image = pipe(DEMO_PROMPTS[1], num_inference_steps=20).images[0]

At the default resolution (256 px) the VAE's 8x downsampling gives a 32×32 latent and the
transformer's 2×2 patches a 16×16 token grid, the same geometry as PixArt-Σ at 256 px.
"""
from __future__ import annotations

from pathlib import Path

import torch

from attnprobe.core.families.pixart import DEMO_DIR, DEMO_RESOLUTION
from attnprobe.demo.data import CAPTIONS

DEMO_DIR: Path = DEMO_DIR
"""Folder of the shipped pipeline (``model_index.json`` and one sub-folder per component)."""

PROMPTS_FILE: Path = Path(__file__).resolve().parent / "prompts.txt"
"""The captions, one per line (the same list as :data:`DEMO_PROMPTS`)."""

DEMO_PROMPTS: list[str] = list(CAPTIONS)
"""The captions the demo model was trained on, in label order."""

DEFAULT_RESOLUTION: int = DEMO_RESOLUTION
"""Image side in pixels the demo model was trained at (32×32 latent, 16×16 tokens)."""

TOKEN_GRID: tuple[int, int] = (16, 16)
"""Transformer token grid at :data:`DEFAULT_RESOLUTION`."""


def load_demo_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", path: str | Path | None = None):
    """Load the shipped demo pipeline strictly offline.

    Returns a ``PixArtSigmaPipeline`` in ``dtype`` on ``device`` with its progress bar disabled.
    Raises ``FileNotFoundError`` (with the command that rebuilds it) when the folder is missing.
    """
    folder = Path(path) if path is not None else DEMO_DIR
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the demo pipeline is missing: {folder} has no model_index.json. Reinstall attnprobe, or rebuild it "
            "(tens of minutes on a CPU) with `pip install 'attnprobe[demo-train]'` and "
            f"`python -m attnprobe.demo.train --out {folder} --threads 2`"
        )
    from diffusers import DiffusionPipeline

    # A local folder with local_files_only never touches the network.
    from attnprobe.core.registry import dtype_kwarg

    pipe = DiffusionPipeline.from_pretrained(str(folder), **dtype_kwarg(dtype), local_files_only=True)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["DEMO_DIR", "DEMO_PROMPTS", "DEFAULT_RESOLUTION", "PROMPTS_FILE", "TOKEN_GRID", "load_demo_pipeline"]
