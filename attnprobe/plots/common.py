"""What every figure shares: sizes, style, file writing, layer order and selection, colours.

Figures are drawn with matplotlib's object API (no pyplot state, no display, the caller's
backend untouched) at a fixed size in inches × ``dpi`` and written once per format.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.image import imread

DPI = 120
FORMATS = ("png", "svg")

# file stem → one-line caption (used by the HTML report, in this order)
FIGURES = {
    "attention_maps": "Mean attention maps of the probe queries (marked +) across layers, over the generated image.",
    "asm_curves": "Attention score mass inside a K×K box and its gradient over K, raw and Butterworth high-passed.",
    "erf": "Effective receptive field per layer and the recommended ΔConvBlock kernel size.",
    "erf_heads": "ERF of every head in every layer.",
    "bias_sinks": "Query-independent (bias) vs local share of attention mass, and attention-sink keys.",
    "erf_over_steps": "ERF per layer over the denoising steps.",
    "gradient_erf": "Teacher self-attention vs distilled ΔConvBlock: input-gradient magnitude around the centre token.",
}

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "figure.titlesize": 13,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "viridis",
    "svg.hashsalt": "attnprobe",  # reproducible SVG ids
    "savefig.facecolor": "white",
}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@contextmanager
def _style():
    with matplotlib.rc_context(_STYLE):
        yield


def _save(fig, out_dir, stem: str, formats: Sequence[str], dpi: int) -> list[Path]:
    """Write ``fig`` once per format at its fixed size (no tight bbox: pixel size = inches × dpi)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        meta = {"Date": None} if fmt == "svg" else {}
        fig.savefig(path, dpi=dpi, format=fmt, metadata=meta)
        paths.append(path)
    return paths


def _title(report) -> str:
    alias = report.model.get("alias") or report.model.get("denoiser") or "model"
    s = report.settings
    h, w = s.get("resolution", ["?", "?"])
    return f"{alias} @ {h}×{w} px · {s.get('aggregate', 'per-map')}, {s.get('border', 'circular')} border"


def forward_order(report) -> list:
    """Layers in the order the forward pass runs them (UNet: down, mid, up; others as stored)."""
    rank = {"down": 0, "mid": 1, "up": 2}

    def key(item):
        i, layer = item
        return rank.get(layer.label.split(".", 1)[0], 1), i

    return [layer for _, layer in sorted(enumerate(report.layers), key=key)]


def _evenly(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


def _spread_with_extremes(layers: list, n: int) -> list:
    """Up to ``n`` layers spread over the depth, always including the smallest and largest ERF."""
    if len(layers) <= n:
        return list(layers)
    must = {id(min(layers, key=lambda l: l.erf)), id(max(layers, key=lambda l: l.erf))}
    rest = _evenly([l for l in layers if id(l) not in must], max(0, n - len(must)))
    keep = must | {id(l) for l in rest}
    return [l for l in layers if id(l) in keep]


def _pick(layers: list, wanted) -> list:
    """Layers by name/label (``wanted``), or all when None."""
    if wanted is None:
        return layers
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    picked = [l for l in layers if l.name in wanted or l.label in wanted]
    if not picked:
        raise ValueError(f"none of the layers {wanted} is in the report; known: {', '.join(l.label for l in layers)}")
    return picked


def step_ranges(steps: int, buckets: int) -> list[tuple[int, int]]:
    """1-based (first, last) denoising step of each bucket (capture puts step s in ⌊s·T/S⌋)."""
    buckets = max(1, min(int(buckets), int(steps)))
    out = []
    for b in range(buckets):
        first = math.ceil(b * steps / buckets)
        last = math.ceil((b + 1) * steps / buckets) - 1
        out.append((first + 1, last + 1))
    return out


def _depth_colorbar(fig, ax, layers: list, cmap, label: str = "layer (forward order)"):
    """Discrete colour bar: one colour per layer, ticks labelled by layer label when few."""
    n = len(layers)
    norm = mcolors.BoundaryNorm(np.arange(n + 1) - 0.5, cmap.N) if n > 1 else mcolors.Normalize(-0.5, 0.5)
    sm = ScalarMappable(norm=norm, cmap=cmap)
    cbar = fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.015, aspect=45)
    if n <= 16:
        cbar.set_ticks(np.arange(n))
        cbar.set_ticklabels([l.label for l in layers])
    else:
        ticks = np.unique(np.round(np.linspace(0, n - 1, 8)).astype(int))
        cbar.set_ticks(ticks)
        cbar.set_ticklabels([layers[i].label for i in ticks])
    cbar.ax.tick_params(labelsize=8)
    cbar.set_label(label)
    return cbar


def _cmap(name: str):
    return matplotlib.colormaps[name]


def _layer_colours(n: int, cmap_name: str = "viridis") -> list:
    cmap = _cmap(cmap_name)
    return [cmap(v) for v in (np.linspace(0.0, 0.92, n) if n > 1 else [0.45])]


def _xticks_layers(ax, layers: list) -> None:
    ax.set_xticks(np.arange(len(layers)))
    rot = 0 if len(layers) <= 6 and max(len(l.label) for l in layers) <= 10 else 60
    ax.set_xticklabels([l.label for l in layers], rotation=rot, ha="right" if rot else "center",
                       fontsize=9 if len(layers) <= 30 else 7)


def _layers_width(n: int, per: float = 0.36, base: float = 3.0, lo: float = 7.0, hi: float = 30.0) -> float:
    return float(min(hi, max(lo, base + per * n)))


def _load_image(images_dir, report, index: int = 0):
    """The ``index``-th generated image as a float RGB array, or None."""
    if images_dir is None or not report.images:
        return None
    path = Path(images_dir) / report.images[min(index, len(report.images) - 1)]
    if not path.is_file():
        return None
    img = imread(path)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3]


def _over_grey(rgba: np.ndarray, grey: np.ndarray, texels: int = 64) -> np.ndarray:
    """Alpha-blend a token-grid RGBA map over a grey image, as one RGB array of ~``texels`` per side.

    The image is box-averaged to s·H' × s·W' (s = max(1, texels // max(H', W'))) and each token
    covers s × s texels: flat blocks keep the figure's PNG small and the token grid visible.
    """
    from PIL import Image

    h, w = rgba.shape[:2]
    s = max(1, texels // max(h, w))
    small = Image.fromarray(np.asarray(grey, dtype=np.float32), mode="F").resize((s * w, s * h), Image.Resampling.BOX)
    bg = np.clip(np.asarray(small), 0.0, 1.0)[..., None]  # (sH', sW', 1)
    fg = np.repeat(np.repeat(rgba, s, axis=0), s, axis=1)  # (sH', sW', 4)
    alpha = fg[..., 3:]
    return fg[..., :3] * alpha + bg * (1.0 - alpha)  # (sH', sW', 3)


def _query_cell(point, grid) -> tuple[int, int]:
    """Token (row, col) of a probe point (y, x fractions), exactly as the capture picks it."""
    (py, px), (h, w) = point, grid
    return min(h - 1, int(py * h)), min(w - 1, int(px * w))


