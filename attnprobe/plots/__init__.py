"""Figures of an ERF report (the paper's Figs. 2, 4 and 5), one function per figure.

Every ``plot_*(report, out_dir, ...)`` draws one figure, writes it as ``<out_dir>/<name>.png``
and ``.svg`` (``formats=``) at a fixed size in inches × ``dpi``, and returns the written paths.
Layers are drawn in forward order (UNet: down, mid, up) and named by their label (``block 3``,
``down.1.0.attn1``).

=================================  ==========================================================
``plot_attention_maps``            mean attention map of each probe query, per layer, over the
                                   generated image (Fig. 2)                     :mod:`.maps`
``plot_asm_curves``                ASM(K)/ASM(∞) and dASM/dK over kernel size K, raw and
                                   high-passed, coloured by depth (Figs. 4a/4b) :mod:`.erf`
``plot_erf``                       ERF per layer (high-passed and raw) with the recommended
                                   kernel size (Fig. 5)                         :mod:`.erf`
``plot_erf_heads``                 ERF per head × layer heat map                :mod:`.erf`
``plot_erf_over_steps``            ERF per denoising-step bucket × layer        :mod:`.erf`
``plot_bias_sinks``                bias/local share per layer and the key-mass map of the layer
                                   with the strongest attention sink            :mod:`.sinks`
=================================  ==========================================================

The teacher-vs-student gradient-ERF figure (Fig. 9) needs a distilled model and lives with the
distillation: ``deltadistill plot`` (:mod:`deltadistill.gradient_erf`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from attnprobe.plots.common import DPI, FIGURES, FORMATS, forward_order, step_ranges
from attnprobe.plots.erf import plot_asm_curves, plot_erf, plot_erf_heads, plot_erf_over_steps
from attnprobe.plots.maps import plot_attention_maps
from attnprobe.plots.sinks import plot_bias_sinks

__all__ = [
    "FIGURES",
    "DPI",
    "FORMATS",
    "plot_all",
    "plot_attention_maps",
    "plot_asm_curves",
    "plot_erf",
    "plot_erf_heads",
    "plot_bias_sinks",
    "plot_erf_over_steps",
    "forward_order",
    "step_ranges",
]


def plot_all(report, out_dir, images_dir=None, *, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """Every figure of ``report`` into ``out_dir``."""
    kw = {"formats": formats, "dpi": dpi}
    paths = plot_attention_maps(report, out_dir, images_dir, **kw)
    paths += plot_asm_curves(report, out_dir, **kw)
    paths += plot_erf(report, out_dir, **kw)
    paths += plot_erf_heads(report, out_dir, **kw)
    paths += plot_bias_sinks(report, out_dir, **kw)
    paths += plot_erf_over_steps(report, out_dir, **kw)
    return paths
