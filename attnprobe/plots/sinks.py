"""Bias vs local share per layer, and the key-mass map of the strongest attention sink."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure  # drawn and saved without pyplot: works under any backend
from matplotlib.patches import Rectangle

from attnprobe.plots.common import (
    DPI, FORMATS, _cmap, _layers_width, _pick, _save, _style, _title, _xticks_layers, forward_order,
)

# ----------------------------------------------------------------------------------------------
# bias / local decomposition and attention sinks
# ----------------------------------------------------------------------------------------------


def _sink_layer(layers: list):
    """The layer with the largest share of mass on flagged sinks, else the most peaked key mass."""
    with_sinks = [l for l in layers if l.has_sink]
    if with_sinks:
        return max(with_sinks, key=lambda l: l.sink_share), True

    def peak(l):
        return float(l.key_mass_ratio.max())

    return max(layers, key=peak), False


def plot_bias_sinks(report, out_dir, *, layers=None, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """Left: stacked local/bias share per layer and the share of mass on sink keys.
    Right: mass received per key for the layer with the strongest sink, sinks outlined."""
    chosen = _pick(forward_order(report), layers)
    n = len(chosen)
    x = np.arange(n)
    local = np.nan_to_num(np.array([l.local_share for l in chosen]), nan=0.0)
    sink = np.array([l.sink_share for l in chosen])
    cividis = _cmap("cividis")
    factor = float(report.settings.get("sink_factor", 5.0))
    with _style():
        fig = Figure(figsize=(_layers_width(n, per=0.32, base=1.5, lo=5.5, hi=22.0) + 5.8, 5.4), layout="constrained")
        gs = fig.add_gridspec(1, 2, width_ratios=[_layers_width(n, per=0.32, base=1.5, lo=5.5, hi=22.0), 5.0])
        ax = fig.add_subplot(gs[0])
        ax.bar(x, local, 0.7, color=cividis(0.85), label="local share (1 − bias share)")
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
        ax.set_title("Bias (query-independent prior, from far queries) vs local share per layer")

        layer, flagged = _sink_layer(chosen)
        h, w = layer.grid
        rel = layer.key_mass_ratio.reshape(h, w)
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
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.03).set_label("mass received / mass its query coverage predicts")
        if flagged:
            ax2.set_title(f"Key mass, {layer.label}: {len(layer.sink_keys)} sink key(s)\n"
                          f"(> {factor:g}× coverage; {layer.sink_share:.0%} of all mass, outlined)")
        else:
            ax2.set_title(f"Key mass, {layer.label}\n(no sink keys > {factor:g}× coverage in any layer)")
        fig.suptitle(f"Bias/local decomposition and attention sinks — {_title(report)}")
        return _save(fig, out_dir, "bias_sinks", formats, dpi)


