"""Figs. 4 and 5: ASM curves, ERF per layer, per head, and over the denoising steps."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # drawn and saved without pyplot: works under any backend
from matplotlib.lines import Line2D

from attnprobe.plots.common import (
    DPI, FORMATS, _cmap, _depth_colorbar, _layer_colours, _layers_width, _pick, _save, _style, _title,
    _xticks_layers, forward_order, step_ranges,
)

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
    tau = report.threshold
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
                k = layer.k_axis
                curve = curve_of(layer)
                kmax = max(kmax, int(k[-1]))
                ax_c.plot(k, curve, color=colour, lw=1.6, alpha=0.9)
                ax_g.plot(k, layer.gradient(curve), color=colour, lw=1.6, alpha=0.9, label=layer.label)
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
            if r == 0 and len(chosen) <= 10:  # few layers: name each line (colours alone are hard to tell apart)
                ax_g.legend(loc="upper right", fontsize=8, ncols=2 if len(chosen) > 5 else 1, title="layer")
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
        fig = Figure(figsize=(_layers_width(n, lo=10.0), 5.6), layout="constrained")  # room for the legend
        ax = fig.subplots()
        erfs = np.array([l.erf for l in chosen], dtype=float)
        ax.bar(x - 0.2, erfs, 0.4, color=viridis(0.35), label="ERF, high-passed maps")
        iv = [l.erf_interval for l in chosen]
        has = np.array([v is not None for v in iv])
        if has.any():
            lo = np.array([e - v[0] if v else 0 for e, v in zip(erfs, iv)])
            hi = np.array([v[1] - e if v else 0 for e, v in zip(erfs, iv)])
            ax.errorbar(x[has] - 0.2, erfs[has], yerr=[lo[has], hi[has]], fmt="none", ecolor="black", elinewidth=1.2,
                        capsize=3, label=f"90% bootstrap interval over {s.get('n_prompts', '?')} prompts")
        for xi, l in zip(x, chosen):
            if l.is_global:
                ax.annotate("global", (xi - 0.2, 0.5), rotation=90, ha="center", va="bottom", fontsize=8, color="tab:red")
        ax.bar(x + 0.2, [l.erf_unfiltered for l in chosen], 0.4, color=viridis(0.8), label="ERF, raw maps")
        ax.scatter(x, [l.kernel_size for l in chosen], marker="D", s=40, color="black", zorder=3,
                   label=f"recommended kernel k = odd(⌈{s.get('kernel_ratio', 0.6)}·ERF⌉)"
                         + (" (interval's upper end)" if s.get("erf_from", "point") == "upper" else "")
                         + "; global layers: kmax")
        kgrid = [2 * max(l.grid) - 1 for l in chosen]
        ax.hlines(kgrid, x - 0.45, x + 0.45, colors="0.45", linestyles=":", lw=1.5,
                  label="largest K on the grid (2·max(H′,W′)−1)")
        ax.hlines([max(l.grid) for l in chosen], x - 0.45, x + 0.45, colors="tab:red", linestyles="--", lw=1.2,
                  label="grid side max(H′,W′): ERF below it is local")
        _xticks_layers(ax, chosen)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylim(0, max(kgrid) * 1.06)
        ax.set_xlabel("layer")
        ax.set_ylabel("ERF (tokens)")
        ax.grid(axis="y", alpha=0.3)
        fig.legend(loc="outside lower center", ncols=2, frameon=False, fontsize="small")
        fig.suptitle(f"Effective receptive field per layer (τ = {report.threshold})\n{_title(report)}")
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
        fig.suptitle(f"ERF per head (high-passed, τ = {report.threshold}) — {_title(report)}")
        return _save(fig, out_dir, "erf_heads", formats, dpi)



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


