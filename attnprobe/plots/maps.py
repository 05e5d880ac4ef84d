"""Fig. 2: the mean attention map of each probe query, per layer, over the generated image."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure  # drawn and saved without pyplot: works under any backend

from attnprobe.plots.common import (
    DPI, FORMATS, _cmap, _evenly, _load_image, _over_grey, _pick, _query_cell, _save, _style, _title,
    forward_order,
)

# ----------------------------------------------------------------------------------------------
# Fig. 2: attention maps at the probe points
# ----------------------------------------------------------------------------------------------


def plot_attention_maps(
    report, out_dir, images_dir=None, *, layers=None, max_layers: int = 6, image_index: int = 0,
    formats: Sequence[str] = FORMATS, dpi: int = DPI,
) -> list[Path]:
    """Rows = probe points, columns = up to ``max_layers`` layers spread over the depth.

    Each panel is the probe query's attention row (mean over heads, prompts and steps) on the
    layer's token grid, normalised to its maximum and drawn with a square-root colour scale; over
    the generated image (grey) when ``images_dir`` holds it. The query token is marked with +.
    Returns [] when the report has no probe maps.
    """
    points = [tuple(p) for p in report.settings.get("probe_points", [])]
    chosen = _evenly(_pick(forward_order(report), layers), max_layers)
    chosen = [l for l in chosen if l.probe_rows > 0 and l.probe_maps.shape[0] == len(points)]
    if not points or not chosen:
        return []
    image = _load_image(images_dir, report, image_index)
    grey = None if image is None else image @ np.array([0.299, 0.587, 0.114])
    cmap = _cmap("magma")
    norm = mcolors.PowerNorm(0.5, vmin=0.0, vmax=1.0)
    ncols = len(chosen) + (image is not None)
    nrows = len(points)
    panel = 2.25
    with _style():
        fig = Figure(figsize=(panel * ncols + 1.6, panel * nrows + 1.3), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for r, point in enumerate(points):
            col0 = 0
            if image is not None:
                ax = axes[r, 0]
                ih, iw = image.shape[:2]
                ax.imshow(image, extent=(0, iw, ih, 0))
                ax.plot(point[1] * iw, point[0] * ih, marker="+", color="cyan", ms=14, mew=2.5)
                ax.set_xticks([0, iw])
                ax.set_yticks([0, ih])
                ax.set_ylabel(f"query (y, x) = ({point[0]:.2f}, {point[1]:.2f})\ny (px)")
                if r == 0:
                    ax.set_title("generated image 1")
                if r == nrows - 1:
                    ax.set_xlabel("x (px)")
                col0 = 1
            for c, layer in enumerate(chosen):
                ax = axes[r, col0 + c]
                h, w = layer.grid
                amap = (layer.probe_maps[r] / layer.probe_rows).reshape(h, w)  # (H', W'), rows sum to ~1
                peak = amap.max()
                scaled = norm(amap / peak if peak > 0 else amap)
                rgba = cmap(np.asarray(scaled))  # (H', W', 4)
                if grey is not None:
                    rgba[..., 3] = 0.35 + 0.6 * np.asarray(scaled)
                    rgba = _over_grey(rgba, grey)
                ax.imshow(rgba, extent=(0, w, h, 0), interpolation="nearest")
                qy, qx = _query_cell(point, (h, w))
                ax.plot(qx + 0.5, qy + 0.5, marker="+", color="cyan", ms=12, mew=2.2)
                ax.text(0.03, 0.03, f"peak {peak * h * w:.1f}× uniform", transform=ax.transAxes, fontsize=8,
                        color="white", va="bottom", ha="left",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "black", "ec": "none", "alpha": 0.55})
                ax.set_xlim(0, w)
                ax.set_ylim(h, 0)
                ax.set_xticks([0, w])
                ax.set_yticks([0, h])
                if r == 0:
                    ax.set_title(f"{layer.label}\n{h}×{w} tokens, ERF {layer.erf}")
                if r == nrows - 1:
                    ax.set_xlabel("x (tokens)")
                if c == 0 and image is None:
                    ax.set_ylabel(f"query (y, x) = ({point[0]:.2f}, {point[1]:.2f})\ny (tokens)")
                elif c == 0:
                    ax.set_ylabel("y (tokens)")
        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.03, pad=0.01, shrink=0.8)
        cbar.set_label("attention / panel max (√ scale)")
        s = report.settings
        sub = (f"mean over heads, {s.get('n_prompts', len(s.get('prompts', [])))} prompt(s) × {s.get('steps')} steps; "
               "peak = panel maximum ÷ uniform attention (1/N)")
        if image is not None:
            sub += "; background: image 1"
        total = len(_pick(forward_order(report), layers))
        if len(chosen) < total:
            sub += f"\nlayers shown: {len(chosen)} of {total}, spread evenly over the depth (max_layers={max_layers})"
        fig.suptitle(f"Attention maps at probe points — {_title(report)}\n{sub}")
        return _save(fig, out_dir, "attention_maps", formats, dpi)


