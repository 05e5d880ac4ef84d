"""Figures of an ERF report (the paper's Figs. 2, 4, 5 and 9), one function per figure.

Every ``plot_*(report, out_dir, ...)`` draws one figure with matplotlib's object API (no pyplot
state, no display, the caller's backend untouched)needed), writes it as ``<out_dir>/<name>.png`` and ``.svg`` (``formats=``) at a fixed size in
inches × ``dpi``, and returns the written paths. Layers are drawn in forward order (UNet: down,
mid, up) and named by their label (``block 3``, ``down.1.0.attn1``).

=================================  ==========================================================
``plot_attention_maps``            mean attention map of each probe query, per layer, over the
                                   generated image (Fig. 2)
``plot_asm_curves``                ASM(K)/ASM(∞) and dASM/dK over kernel size K, raw and
                                   high-passed, coloured by depth (Figs. 4a/4b)
``plot_erf``                       ERF per layer (high-passed and raw) with the recommended
                                   kernel size (Fig. 5)
``plot_erf_heads``                 ERF per head × layer heat map
``plot_bias_sinks``                bias/local share per layer and the key-mass map of the layer
                                   with the strongest attention sink
``plot_erf_over_steps``            ERF per denoising-step bucket × layer heat map
``plot_gradient_erf``              teacher self-attention vs student ΔConvBlock: input-gradient
                                   magnitude around the centre token (Fig. 9)
=================================  ==========================================================

Gradient ERF (:func:`gradient_erf`). For a layer f: x ∈ R^{H×W×C} ↦ y, the map
G[u, v] = Σ_c |∂(Σ_c' y[c_y, c_x, c']) / ∂x[u, v, c]| shows which input tokens the centre output
depends on. The attention of a trained DiT has no notion of position by itself (positions enter
through the features), so the teacher is evaluated on real hidden states recorded from a
generation (:func:`record_attention_inputs`); random inputs are the fallback.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure  # drawn and saved without pyplot: works under any backend
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

__all__ = [
    "FIGURES",
    "DPI",
    "plot_all",
    "plot_attention_maps",
    "plot_asm_curves",
    "plot_erf",
    "plot_erf_heads",
    "plot_bias_sinks",
    "plot_erf_over_steps",
    "plot_gradient_erf",
    "gradient_erf",
    "record_attention_inputs",
    "load_teacher_student",
    "forward_order",
    "step_ranges",
]

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
    h, w = report.settings.get("resolution", ["?", "?"])
    return f"{alias} @ {h}×{w} px"


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
        fig.suptitle(f"Attention maps at probe points — {_title(report)}\n{sub}")
        return _save(fig, out_dir, "attention_maps", formats, dpi)


# ----------------------------------------------------------------------------------------------
# Figs. 4a/4b: ASM curves and their gradient
# ----------------------------------------------------------------------------------------------


def plot_asm_curves(report, out_dir, *, layers=None, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """2×2 panels: ASM(K)/ASM(∞) and dASM/dK over K, raw (top) and high-passed (bottom).

    One line per layer, coloured by forward depth (viridis); the dashed line is τ and the dots mark
    each layer's ERF on the high-passed curve.
    """
    chosen = _pick(forward_order(report), layers)
    colours = _layer_colours(len(chosen))
    s = report.settings
    tau = float(s.get("threshold", 0.8))
    hp_kind = "positive part" if s.get("highpass_mass", "positive") == "positive" else "|Λ|"
    with _style():
        fig = Figure(figsize=(12.5, 8.6), layout="constrained")
        axes = fig.subplots(2, 2, sharex=True)
        rows = [
            ("raw attention", lambda l: l.asm_curve, lambda l: l.erf_unfiltered),
            ("high-passed", lambda l: l.hp_asm_curve, lambda l: l.erf),
        ]
        kmax = 1
        for r, (kind, curve_of, erf_of) in enumerate(rows):
            ax_c, ax_g = axes[r]
            for layer, colour in zip(chosen, colours):
                k = layer.kernel_sizes
                curve = curve_of(layer)
                kmax = max(kmax, int(k[-1]))
                ax_c.plot(k, curve, color=colour, lw=1.6, alpha=0.9)
                ax_g.plot(k, layer.gradient(curve), color=colour, lw=1.6, alpha=0.9)
                erf = erf_of(layer)
                if erf > 0:
                    ax_c.plot(erf, curve[(erf - 1) // 2], "o", color=colour, ms=5, mec="black", mew=0.6)
            ax_c.axhline(tau, color="0.3", ls="--", lw=1)
            ax_c.set_ylim(0, 1.02)
            ax_c.set_ylabel("ASM(K) / ASM(∞)")
            ax_c.set_title(f"({'ac'[r]}) ASM, {kind}", loc="left")
            ax_g.set_ylabel("dASM / dK (per token)")
            ax_g.set_title(f"({'bd'[r]}) gradient of ASM, {kind}", loc="left")
            ax_g.set_ylim(bottom=0)
            handles = [
                Line2D([], [], color="0.3", ls="--", label=f"τ = {tau:g}"),
                Line2D([], [], ls="", marker="o", color="0.6", mec="black", label="ERF (first K with ASM ≥ τ)"),
            ]
            ax_c.legend(handles=handles, loc="lower right")
            for ax in (ax_c, ax_g):
                ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("kernel size K (tokens)")
            ax.set_xlim(1, kmax)
        _depth_colorbar(fig, axes, chosen, _cmap("viridis").resampled(max(2, len(chosen))))
        fig.suptitle(f"Attention score mass inside a K×K box around the query — {_title(report)}\n"
                     f"high-pass: Butterworth D0 = {s.get('cutoff')}, n = {s.get('order')}, ASM over the {hp_kind} of Λ")
        return _save(fig, out_dir, "asm_curves", formats, dpi)


# ----------------------------------------------------------------------------------------------
# Fig. 5: ERF per layer, and per head
# ----------------------------------------------------------------------------------------------


def plot_erf(report, out_dir, *, layers=None, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """Bars: ERF of the high-passed and of the raw maps per layer; diamonds: recommended kernel size."""
    chosen = _pick(forward_order(report), layers)
    n = len(chosen)
    x = np.arange(n)
    s = report.settings
    viridis = _cmap("viridis")
    with _style():
        fig = Figure(figsize=(_layers_width(n), 5.0), layout="constrained")
        ax = fig.subplots()
        ax.bar(x - 0.2, [l.erf for l in chosen], 0.4, color=viridis(0.35), label="ERF, high-passed maps")
        ax.bar(x + 0.2, [l.erf_unfiltered for l in chosen], 0.4, color=viridis(0.8), label="ERF, raw maps")
        ax.scatter(x, [l.kernel_size for l in chosen], marker="D", s=40, color="black", zorder=3,
                   label=f"recommended kernel k = odd(⌈{s.get('kernel_ratio', 0.6)}·ERF⌉)")
        kgrid = [2 * max(l.grid) - 1 for l in chosen]
        ax.hlines(kgrid, x - 0.45, x + 0.45, colors="0.45", linestyles=":", lw=1.5,
                  label="largest K on the grid (2·max(H′,W′)−1)")
        ax.hlines([max(l.grid) for l in chosen], x - 0.45, x + 0.45, colors="tab:red", linestyles="--", lw=1.2,
                  label="grid side max(H′,W′): ERF below it is local")
        _xticks_layers(ax, chosen)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylim(0, max(kgrid) * 1.35)  # headroom for the legend
        ax.set_xlabel("layer")
        ax.set_ylabel("ERF (tokens)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", ncols=2, frameon=True, framealpha=0.9)
        fig.suptitle(f"Effective receptive field per layer (τ = {s.get('threshold', 0.8)}) — {_title(report)}")
        return _save(fig, out_dir, "erf", formats, dpi)


def _erf_heatmap(fig, ax, values: np.ndarray, fontsize: float) -> None:
    """ERF heat map (NaN cells blank), framed, with a colour bar; each cell labelled when ≤ 600."""
    im = ax.imshow(np.ma.masked_invalid(values), cmap="cividis", aspect="auto", interpolation="nearest")
    if values.size <= 600:
        lo, hi = np.nanmin(values), np.nanmax(values)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                bright = (v - lo) / (hi - lo) > 0.6 if hi > lo else True
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=fontsize,
                        color="black" if bright else "white")
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("ERF (tokens)")


def plot_erf_heads(report, out_dir, *, layers=None, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """Heat map heads × layers of the per-head ERF (blank where a layer has fewer heads)."""
    chosen = _pick(forward_order(report), layers)
    n = len(chosen)
    heads = max(l.heads for l in chosen)
    grid = np.full((heads, n), np.nan)
    for j, layer in enumerate(chosen):
        grid[: layer.heads, j] = layer.erf_per_head
    with _style():
        fig = Figure(figsize=(_layers_width(n, base=3.2), min(14.0, max(3.8, 0.32 * heads + 2.4))), layout="constrained")
        ax = fig.subplots()
        _erf_heatmap(fig, ax, grid, fontsize=7.5 if n > 12 else 8.5)
        _xticks_layers(ax, chosen)
        step = max(1, heads // 16)
        ax.set_yticks(np.arange(0, heads, step))
        ax.set_xlabel("layer")
        ax.set_ylabel("head index")
        fig.suptitle(f"ERF per head (high-passed, τ = {report.settings.get('threshold', 0.8)}) — {_title(report)}")
        return _save(fig, out_dir, "erf_heads", formats, dpi)


# ----------------------------------------------------------------------------------------------
# bias / local decomposition and attention sinks
# ----------------------------------------------------------------------------------------------


def _sink_layer(layers: list):
    """The layer with the largest share of mass on flagged sinks, else the most peaked key mass."""
    with_sinks = [l for l in layers if l.has_sink]
    if with_sinks:
        return max(with_sinks, key=lambda l: l.sink_share), True

    def peak(l):
        m = l.key_mass.mean()
        return l.key_mass.max() / m if m > 0 else 0.0

    return max(layers, key=peak), False


def plot_bias_sinks(report, out_dir, *, layers=None, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """Left: stacked local/bias share per layer and the share of mass on sink keys.
    Right: mass received per key for the layer with the strongest sink, sinks outlined."""
    chosen = _pick(forward_order(report), layers)
    n = len(chosen)
    x = np.arange(n)
    local = np.array([l.local_share for l in chosen])
    sink = np.array([l.sink_share for l in chosen])
    cividis = _cmap("cividis")
    factor = float(report.settings.get("sink_factor", 5.0))
    with _style():
        fig = Figure(figsize=(_layers_width(n, per=0.32, base=1.5, lo=5.5, hi=22.0) + 5.8, 5.4), layout="constrained")
        gs = fig.add_gridspec(1, 2, width_ratios=[_layers_width(n, per=0.32, base=1.5, lo=5.5, hi=22.0), 5.0])
        ax = fig.add_subplot(gs[0])
        ax.bar(x, local, 0.7, color=cividis(0.85), label="local share (high-pass Λ⁺ / A)")
        ax.bar(x, 1 - local, 0.7, bottom=local, color=cividis(0.2), label="bias share (query-independent prior)")
        has = np.array([l.has_sink for l in chosen])
        if has.any():
            ax.scatter(x[has], sink[has], marker="v", s=46, color="#e8503a", edgecolor="black", lw=0.5, zorder=3,
                       label="share of mass on sink keys (count above)")
            for xi, l in ((xi, l) for xi, l in zip(x, chosen) if l.has_sink):
                ax.annotate(f"{len(l.sink_keys)}", (xi, l.sink_share + 0.02), ha="center", fontsize=8)
        _xticks_layers(ax, chosen)
        ax.set_ylim(0, 1.3)  # headroom for the legend
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel("layer")
        ax.set_ylabel("share of attention mass")
        ax.legend(loc="upper center", ncols=2 if n > 8 else 1, framealpha=0.9)
        ax.set_title("Bias vs local share per layer")

        layer, flagged = _sink_layer(chosen)
        h, w = layer.grid
        km = layer.key_mass.reshape(h, w)
        rel = km / km.mean() if km.mean() > 0 else km
        ax2 = fig.add_subplot(gs[1])
        positive = rel[rel > 0]
        if positive.size and rel.max() / max(positive.min(), 1e-12) > 20:
            norm = mcolors.LogNorm(vmin=max(positive.min(), rel.max() * 1e-3), vmax=rel.max())
        else:
            norm = mcolors.Normalize(vmin=0, vmax=max(rel.max(), 1e-12))
        im = ax2.imshow(np.maximum(rel, 1e-12), cmap="magma", norm=norm, extent=(0, w, h, 0), interpolation="nearest")
        for k in layer.sink_keys:
            ax2.add_patch(Rectangle((k % w, k // w), 1, 1, fill=False, ec="cyan", lw=2))
        ax2.set_xlabel("key x (tokens)")
        ax2.set_ylabel("key y (tokens)")
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.03).set_label("mass received / mean per key")
        if flagged:
            ax2.set_title(f"Key mass, {layer.label}: {len(layer.sink_keys)} sink key(s)\n"
                          f"(> {factor:g}× mean; {layer.sink_share:.0%} of all mass, outlined)")
        else:
            ax2.set_title(f"Key mass, {layer.label}\n(no sink keys > {factor:g}× mean in any layer)")
        fig.suptitle(f"Bias/local decomposition and attention sinks — {_title(report)}")
        return _save(fig, out_dir, "bias_sinks", formats, dpi)


# ----------------------------------------------------------------------------------------------
# ERF over denoising steps
# ----------------------------------------------------------------------------------------------


def plot_erf_over_steps(report, out_dir, *, layers=None, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """Heat map layers × step buckets of the ERF; left column = first (noisiest) steps."""
    chosen = _pick(forward_order(report), layers)
    n = len(chosen)
    s = report.settings
    per = np.array([l.erf_per_bucket for l in chosen], dtype=float)  # (layers, T)
    t = per.shape[1]
    ranges = step_ranges(int(s.get("steps", t)), t)
    labels = [f"steps {a}–{b}" if b > a else f"step {a}" for a, b in ranges]
    with _style():
        fig = Figure(figsize=(max(6.5, 1.35 * t + 4.2), min(16.0, max(3.8, 0.3 * n + 2.2))), layout="constrained")
        ax = fig.subplots()
        _erf_heatmap(fig, ax, per, fontsize=8.5 if n <= 30 else 7)
        ax.set_xticks(np.arange(t))
        ax.set_xticklabels(labels)
        ax.set_yticks(np.arange(n))
        ax.set_yticklabels([l.label for l in chosen], fontsize=9 if n <= 30 else 7)
        ax.set_xlabel(f"denoising steps of {s.get('steps')} (first = noisiest)")
        ax.set_ylabel("layer (forward order)")
        fig.suptitle(f"ERF over denoising steps — {_title(report)}")
        return _save(fig, out_dir, "erf_over_steps", formats, dpi)


# ----------------------------------------------------------------------------------------------
# Fig. 9: gradient ERF, teacher vs student
# ----------------------------------------------------------------------------------------------


def gradient_erf(
    module_forward: Callable,
    grid: tuple[int, int],
    channels: int,
    *,
    layout: str = "tokens",
    inputs=None,
    samples: int = 1,
    seed: int = 0,
    centre: tuple[int, int] | None = None,
    device=None,
    dtype=None,
) -> np.ndarray:
    """|∂ y[centre] / ∂ x| summed over channels, as an (H, W) map, averaged over input samples.

    ``module_forward`` maps ``[1, N, C]`` tokens (``layout="tokens"``, e.g. an attention module)
    or ``[1, H, W, C]`` (``layout="grid"``, e.g. a ΔConvBlock) to the same shape. The inputs are
    ``inputs`` ([S, N, C] or [S, H, W, C], e.g. recorded hidden states) or, when None, ``samples``
    draws of N(0, 1) with ``seed``. The sum over channels of the centre token's output is
    back-propagated to the input.
    """
    import torch

    if layout not in ("tokens", "grid"):
        raise ValueError(f"layout must be 'tokens' or 'grid', got {layout!r}")
    h, w = (int(v) for v in grid)
    cy, cx = centre if centre is not None else (h // 2, w // 2)
    if inputs is None:
        gen = torch.Generator().manual_seed(int(seed))
        xs = torch.randn(int(samples), h * w, int(channels), generator=gen)
    else:
        xs = torch.as_tensor(inputs).detach().reshape(-1, h * w, int(channels))
    total = np.zeros((h, w))
    with torch.enable_grad():
        for x in xs:
            x = x.reshape((1, h * w, channels) if layout == "tokens" else (1, h, w, channels))
            x = x.to(device=device, dtype=dtype).requires_grad_(True)
            y = module_forward(x)
            y_c = y[0, cy * w + cx] if layout == "tokens" else y[0, cy, cx]  # (C_out,)
            (g,) = torch.autograd.grad(y_c.float().sum(), x)
            total += g.detach().float().abs().reshape(h, w, channels).sum(-1).cpu().numpy()
    return total / len(xs)


def _box_share(gmap: np.ndarray, centre: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(K, share of the map's mass inside the K×K box around ``centre``) for K = 1, 3, …"""
    h, w = gmap.shape
    yy, xx = np.mgrid[:h, :w]
    ring = np.maximum(np.abs(yy - centre[0]), np.abs(xx - centre[1]))
    rings = np.bincount(ring.ravel(), weights=gmap.ravel())  # (R,), R−1 = farthest ring from the centre
    total = rings.sum()
    share = np.cumsum(rings) / total if total > 0 else np.zeros_like(rings)
    return 2 * np.arange(len(rings)) + 1, share


def record_attention_inputs(pipe, names: Sequence[str], *, prompt: str, resolution=None, steps: int = 8,
                            step: int | None = None, seed: int = 0) -> dict:
    """Hidden states entering the named self-attention modules at one denoising step.

    Generates one image for ``prompt`` and records, at denoiser call ``step`` (default: the middle
    step), the ``hidden_states`` [1, N, C] each module receives (the conditional CFG branch).
    """
    import torch

    from attnprobe.arch import denoiser_of
    from attnprobe.run import generate_one, resolve_resolution

    den = denoiser_of(pipe)
    modules = dict(den.named_modules())
    target = steps // 2 if step is None else int(step)
    state = {"call": -1}
    found: dict = {}

    def count(module, args, kwargs):
        state["call"] += 1

    def make(name):
        def hook(module, args, kwargs):
            if state["call"] == target and name not in found:
                hs = args[0] if args else kwargs["hidden_states"]
                found[name] = hs[-1:].detach().clone()  # last batch entry = conditional branch
        return hook

    handles = [den.register_forward_pre_hook(count, with_kwargs=True)]
    try:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(make(name), with_kwargs=True))
        h, w = resolve_resolution(pipe, resolution)
        with torch.no_grad():
            generate_one(pipe, prompt, height=h, width=w, steps=steps, seed=seed, output_type="latent")
    finally:
        for handle in handles:
            handle.remove()
    return found


def load_teacher_student(report, student_folder, *, device: str = "cpu"):
    """(teacher, student) pipelines: the report's base model, and a second copy with the distilled
    blocks of ``student_folder`` loaded (``deltadistill.io.load``)."""
    from deltadistill.io import load as load_blocks

    from attnprobe.registry import load_pipeline

    name = report.model.get("alias") or report.model.get("source")
    if not name:
        raise ValueError("the report does not name its model; cannot load the teacher")
    teacher, _ = load_pipeline(name, dtype="fp32", device=device)
    student, _ = load_pipeline(name, dtype="fp32", device=device)
    load_blocks(student, student_folder)
    return teacher, student


def plot_gradient_erf(
    report, out_dir, teacher, student, *, layers=None, max_layers: int = 4, prompt: str | None = None,
    steps: int | None = None, random_inputs: bool = False, formats: Sequence[str] = FORMATS, dpi: int = DPI,
) -> list[Path]:
    """Teacher self-attention vs student ΔConvBlock, per layer: |∂y_centre/∂x| maps and box share.

    ``teacher``: the base pipeline; ``student``: a pipeline converted by ``deltadistill.convert``
    or ``deltadistill.io.load``. Both layers are evaluated on the same inputs: hidden states the
    teacher's layer receives at the middle step of a ``steps``-step generation (default: the
    report's steps, at most 20) of ``prompt`` (default: the report's first prompt), or N(0, 1) when
    ``random_inputs``. Returns [] (with a warning) when deltadistill is missing or the student has
    no converted layer.
    """
    try:
        from deltadistill.conversion import delta_modules
    except ImportError as exc:
        warnings.warn(f"gradient ERF figure skipped: deltadistill is not importable ({exc})")
        return []
    from attnprobe.arch import denoiser_of, find_self_attention

    blocks = delta_modules(student)
    teacher_mods = {s.name: s.module for s in find_self_attention(denoiser_of(teacher))}
    chosen = [l for l in _pick(forward_order(report), layers) if l.name in blocks and l.name in teacher_mods]
    if not chosen:
        warnings.warn("gradient ERF figure skipped: the student has no converted layer in common with the report")
        return []
    chosen = _spread_with_extremes(chosen, max_layers)
    inputs = {}
    steps = int(steps or min(int(report.settings.get("steps", 8)), 20))
    if not random_inputs:
        prompts = report.settings.get("prompts") or ["a photo"]
        inputs = record_attention_inputs(teacher, [l.name for l in chosen], prompt=prompt or prompts[0],
                                         resolution=report.settings.get("resolution"), steps=steps)
    tau = float(report.settings.get("threshold", 0.8))
    cmap = _cmap("magma")
    norm = mcolors.LogNorm(vmin=1e-3, vmax=1.0)
    with _style():
        fig = Figure(figsize=(12.0, 3.3 * len(chosen) + 1.1), layout="constrained")
        axes = fig.subplots(len(chosen), 3, squeeze=False, width_ratios=[1, 1, 1.25])
        for r, layer in enumerate(chosen):
            h, w = layer.grid
            block = blocks[layer.name].block
            attn = teacher_mods[layer.name]
            channels = block.dim
            x = inputs.get(layer.name)
            if x is not None and x.shape[1] != h * w:
                x = None  # recorded at another resolution: fall back to random inputs
            dtype = block.proj_in.weight.dtype
            maps = {
                "teacher": gradient_erf(lambda z: attn(z), (h, w), channels, inputs=x, samples=4, dtype=dtype),
                "student": gradient_erf(block, (h, w), channels, layout="grid", inputs=x, samples=4, dtype=dtype),
            }
            titles = {"teacher": f"teacher self-attention\n{layer.label}",
                      "student": f"student ΔConvBlock (k = {block.kernel_size})\n{layer.label}"}
            centre = (h // 2, w // 2)
            ax_curve = axes[r, 2]
            for c, (who, gmap) in enumerate(maps.items()):
                ax = axes[r, c]
                peak = gmap.max()
                ax.imshow(np.maximum(gmap / peak if peak > 0 else gmap, 1e-6), cmap=cmap, norm=norm,
                          extent=(0, w, h, 0), interpolation="nearest")
                ax.plot(centre[1] + 0.5, centre[0] + 0.5, marker="+", color="cyan", ms=10, mew=2)
                ax.set_title(titles[who])
                ax.set_xlabel("x (tokens)")
                ax.set_ylabel("y (tokens)")
                k, share = _box_share(gmap, centre)
                gerf = int(k[np.argmax(share >= tau - 1e-9)]) if share[-1] > 0 else 0
                ax_curve.plot(k, share, lw=2, color=_cmap("viridis")(0.2 if who == "teacher" else 0.75),
                              label=f"{who}: gradient ERF {gerf}")
            ax_curve.axhline(tau, color="0.3", ls="--", lw=1, label=f"τ = {tau:g}")
            ax_curve.axvline(layer.erf, color="0.5", ls=":", lw=1.2, label=f"attention ERF {layer.erf} (report, all queries)")
            ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax_curve.set_ylim(0, 1.02)
            ax_curve.set_xlim(1, max(k[-1], layer.erf + 1))
            ax_curve.set_xlabel("kernel size K (tokens)")
            ax_curve.set_ylabel("share of |∂y/∂x| in K×K box")
            ax_curve.grid(alpha=0.3)
            ax_curve.legend(loc="lower right", fontsize=8)
        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[:, :2], fraction=0.035, pad=0.02, shrink=0.9)
        cbar.set_label("|∂y_centre/∂x| / max (log scale)")
        src = "random N(0,1) inputs" if random_inputs or not inputs else f"hidden states at step {steps // 2 + 1} of {steps}"
        fig.suptitle(f"Effective receptive field by input gradient: teacher vs student — {_title(report)}\n"
                     f"centre token marked +; {src}")
        return _save(fig, out_dir, "gradient_erf", formats, dpi)


# ----------------------------------------------------------------------------------------------
# all figures
# ----------------------------------------------------------------------------------------------


def plot_all(report, out_dir, images_dir=None, *, teacher=None, student=None, formats: Sequence[str] = FORMATS,
             dpi: int = DPI) -> list[Path]:
    """Every figure of ``report`` into ``out_dir``; the gradient-ERF figure only with teacher and student."""
    kw = {"formats": formats, "dpi": dpi}
    paths = plot_attention_maps(report, out_dir, images_dir, **kw)
    paths += plot_asm_curves(report, out_dir, **kw)
    paths += plot_erf(report, out_dir, **kw)
    paths += plot_erf_heads(report, out_dir, **kw)
    paths += plot_bias_sinks(report, out_dir, **kw)
    paths += plot_erf_over_steps(report, out_dir, **kw)
    if teacher is not None and student is not None:
        paths += plot_gradient_erf(report, out_dir, teacher, student, **kw)
    return paths
