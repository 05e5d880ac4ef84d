"""Fig. 9 of the paper: the receptive field of teacher self-attention vs the student ΔConvBlock.

Gradient ERF (:func:`gradient_erf`). For a layer f: x ∈ R^{H×W×C} ↦ y, the map
G[u, v] = Σ_c |∂(Σ_c' y[c_y, c_x, c']) / ∂x[u, v, c]| shows which input tokens the centre output
depends on. The attention of a trained DiT has no notion of position by itself (positions enter
through the features), so the teacher is evaluated on real hidden states recorded from a
generation (:func:`record_attention_inputs`); random inputs are the fallback. Both sides are
measured on their *local* part: the student's pyramid branch (and its key-weighted branch, which also
sees only the K×K window of each stage) without its global branch (:meth:`DeltaConvBlock.local`), the teacher's attention minus its mean-field value
(:func:`mean_field`, the query-independent output under uniform attention). Otherwise the global
branch adds the same gradient to every input token and every student looks global.
:func:`plot_gradient_erf` draws the figure (``deltadistill plot``); its style and file handling
are attnprobe's (:mod:`attnprobe.plots.common`).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from attnprobe.plots.common import DPI, FORMATS, _cmap, _pick, _save, _spread_with_extremes, _style, _title, forward_order

__all__ = ["gradient_erf", "mean_field", "record_attention_inputs", "load_teacher_student", "plot_gradient_erf"]


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


def mean_field(attn, z: torch.Tensor) -> torch.Tensor:
    """The attention's output under uniform weights, W_o (W_v z̄ + b_v) + b_o, broadcast over tokens [B, N, C]."""
    out = attn.to_out[0] if isinstance(attn.to_out, (torch.nn.ModuleList, torch.nn.Sequential)) else attn.to_out
    return out(attn.to_v(z.mean(dim=1, keepdim=True))).expand_as(z)


def record_attention_inputs(pipe, names: Sequence[str], *, prompt: str, resolution=None, steps: int = 8,
                            step: int | None = None, seed: int = 0) -> dict:
    """Hidden states entering the named self-attention modules at one denoising step.

    Generates one image for ``prompt`` and records, at denoiser call ``step`` (default: the middle
    step), the ``hidden_states`` [1, N, C] each module receives (the conditional CFG branch).
    """
    from attnprobe.core.family import denoiser_of
    from attnprobe.core.pipeline import generate_one, resolve_resolution

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
    from attnprobe.core.registry import load_pipeline
    from deltadistill.io import load as load_blocks

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
    ``random_inputs``. Returns [] (with a warning) when the student has no converted layer.
    """
    from attnprobe.core.family import denoiser_of, find_self_attention
    from deltadistill.conversion import delta_modules

    blocks = delta_modules(student)
    if any(getattr(m.block, "kind", None) == "linear" for m in blocks.values()):
        from attnprobe.core.errors import UserError

        raise UserError("the gradient-ERF figure measures ΔConvBlocks' pyramid branch; this student is linear attention")
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
    tau = report.threshold
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
            # local parts only: the global branch / mean-field value is a query-independent floor that
            # would spread every map over the whole grid and hide the kernel's reach
            maps = {
                "teacher": gradient_erf(lambda z: attn(z) - mean_field(attn, z), (h, w), channels, inputs=x, samples=4,
                                        dtype=dtype),
                "student": gradient_erf(block.local, (h, w), channels, layout="grid", inputs=x, samples=4, dtype=dtype),
            }
            titles = {"teacher": f"teacher self-attention − mean field\n{layer.label}",
                      "student": f"student ΔConvBlock, {'local branches' if getattr(block, 'key_width', 0) else 'pyramid branch'} "
                                 f"(k = {block.kernel_size})\n{layer.label}"}
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
            ax_curve.axvline(layer.erf, color="0.5", ls=":", lw=1.2, label=f"attention ERF {layer.erf} (report, queries {report.settings.get('queries', '?')})")
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
        fig.suptitle(f"Local receptive field by input gradient (query-independent parts removed): teacher vs student — "
                     f"{_title(report)}\n"
                     f"centre token marked +; {src}")
        return _save(fig, out_dir, "gradient_erf", formats, dpi)
