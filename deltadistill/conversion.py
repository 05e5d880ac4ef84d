"""Replace the self-attention of a diffusion denoiser with ΔConvBlocks (SPEC §2).

``convert(pipe, K)`` swaps every self-attention module of a convertible family (PixArt-Σ/α,
SD1.5/SDXL UNets, DiT, HunyuanDiT; the sites its adapter finds,
:func:`attnprobe.core.family.find_self_attention`) for a :class:`DeltaConvAttention`. The host
transformer block calls it exactly like the original::

    out = attn1(norm_hidden_states, encoder_hidden_states=None, attention_mask=mask, **kwargs)
    #   [B, N, C]  →  tokens row-major on the H'×W' grid  →  DeltaConvBlock  →  [B, N, C]

so the host keeps its own norm, PixArt's adaLN shift/scale/gate, the residual, cross-attention
and feed-forward. Everything except the new blocks is frozen (``requires_grad_(False)``).

Token grid. The host only passes [B, N, C]; a non-square image cannot be recovered from N. A
forward pre-hook on the denoiser (:class:`GridRecorder`) asks the family adapter for the base
token grid of every call (:meth:`~attnprobe.core.family.Family.grid_from_call`), and each wrapper
halves it ``level`` times (:func:`attnprobe.core.sites.halve_grid`). Called outside a denoiser
forward (or when the recorded grid does not hold N tokens) it falls back to a square grid, and
raises if N is not a square.

Initialisation. The blocks start with ``proj_out = 0`` (see :mod:`deltadistill.block`), and by
default (``init="mean_field"``) the global branch is set to the teacher's attention under
*uniform* attention weights: with A = 1/N, attention(z)_i = W_o (W_v z̄ + b_v) + b_o for every
query i, which is exactly a linear map of the token mean z̄ — the global branch's form — with
W = W_o W_v, b = W_o b_v + b_o. The converted model thus starts at the teacher with each
self-attention replaced by its mean-field (query-independent) value, and distillation only has
to learn the local, content-dependent remainder. ``init="zero"`` starts the global branch at 0.

Joint attention (FLUX, SD3) carries the text conditioning, so those families are refused.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from attnprobe.core.errors import UserError
from attnprobe.core.family import denoiser_of, family_of, families, find_self_attention
from attnprobe.core.sites import halve_grid
from deltadistill.block import DeltaConvBlock
from deltadistill.kernel_spec import KernelSpecError, kernel_sizes, select

__all__ = [
    "convert",
    "delta_modules",
    "DeltaConvAttention",
    "AlreadyConvertedError",
    "KernelSpecError",
    "GridRecorder",
    "get_denoiser",
    "conversion_info",
    "convertible_sites",
    "install",
]

INITS = ("mean_field", "zero")
STUDENTS = ("deltaconv", "linear")
get_denoiser = denoiser_of  # the denoiser of a pipeline, unwrapping DDP / torch.compile


class AlreadyConvertedError(UserError):
    """The denoiser already holds ΔConvBlocks."""


class GridRecorder:
    """Forward pre-hook on the denoiser: remembers the base token grid of its current call.

    A callable object (not a closure) so that ``copy.deepcopy(denoiser)`` copies it together with
    the wrappers that point to it: a deep-copied student keeps a working, independent grid.
    """

    def __init__(self, family):
        self.family = family
        self.base_grid: tuple[int, int] | None = None

    def __call__(self, module, args, kwargs):
        grid = self.family.grid_from_call(module, args, kwargs)
        if grid is not None:
            self.base_grid = grid
        return None


class DeltaConvAttention(nn.Module):
    """Drop-in replacement for a self-attention module: ``[B, N, C] → [B, N, C]`` via a ΔConvBlock.

    Attributes: ``block`` (the trainable :class:`DeltaConvBlock`), ``site_name`` (qualified module
    name), ``label``, ``family``, ``level`` (halvings of the base grid). ``attention_mask`` and
    extra keyword arguments (rotary embeddings, ``cross_attention_kwargs``) are accepted and
    ignored: a convolution over the full grid has no key mask and knows where its taps are.
    """

    def __init__(self, block: DeltaConvBlock, *, site_name: str, label: str, family: str, level: int = 0,
                 recorder: GridRecorder | None = None):
        super().__init__()
        self.block = block
        self.site_name, self.label, self.family = site_name, label, family
        self.level = int(level)
        self.recorder = recorder

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, level={self.level}"

    def token_grid(self, n_tokens: int) -> tuple[int, int]:
        """(H', W') with H'·W' = ``n_tokens`` for the current call (see module docstring)."""
        base = self.recorder.base_grid if self.recorder is not None else None
        if base is not None:
            grid = halve_grid(base, self.level)
            if grid[0] * grid[1] == n_tokens:
                return grid
        side = math.isqrt(n_tokens)
        if side * side == n_tokens:
            return side, side
        raise ValueError(
            f"{self.site_name}: cannot place {n_tokens} tokens on a grid (recorded base grid {base}, level "
            f"{self.level}); call it through the denoiser's forward so the grid is recorded, or use a square token count"
        )

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError(
                f"{self.site_name} was converted as self-attention but got encoder_hidden_states; "
                "cross-/joint attention cannot be replaced by a ΔConvBlock"
            )
        if hidden_states.ndim != 3:
            raise ValueError(f"{self.site_name}: expected tokens [B, N, C], got shape {tuple(hidden_states.shape)}")
        b, n, c = hidden_states.shape
        h, w = self.token_grid(n)
        dtype = next(self.block.parameters()).dtype
        z = hidden_states.reshape(b, h, w, c)  # [B, N, C] → [B, H', W', C], row-major
        if z.dtype != dtype and not torch.is_autocast_enabled(z.device.type):
            z = z.to(dtype)  # e.g. fp32 master blocks inside a bf16 frozen model
        out = self.block(z)  # [B, H', W', C]
        return out.reshape(b, n, c).to(hidden_states.dtype)  # [B, N, C]


def delta_modules(denoiser) -> dict[str, DeltaConvAttention]:
    """``{qualified module name: DeltaConvAttention}`` of a converted denoiser (or pipeline), in order."""
    den = denoiser_of(denoiser)
    return {name: mod for name, mod in den.named_modules() if isinstance(mod, DeltaConvAttention)}


def conversion_info(denoiser) -> dict:
    """What :func:`convert` recorded on the denoiser (kernel source, report hash); ``{}`` if none."""
    return dict(getattr(denoiser_of(denoiser), "_deltadistill_info", {}) or {})


@torch.no_grad()
def _mean_field_init(block: DeltaConvBlock, attn: nn.Module) -> bool:
    """global_proj ← attention under uniform weights: W_o W_v, W_o b_v + b_o. False if not applicable."""
    to_v, to_out = getattr(attn, "to_v", None), getattr(attn, "to_out", None)
    out = to_out[0] if isinstance(to_out, (nn.ModuleList, nn.Sequential)) else to_out
    if not (isinstance(to_v, nn.Linear) and isinstance(out, nn.Linear)):
        return False
    plain = (
        not getattr(attn, "residual_connection", False)
        and float(getattr(attn, "rescale_output_factor", 1.0)) == 1.0
        and getattr(attn, "group_norm", None) is None
        and getattr(attn, "spatial_norm", None) is None
    )
    if not plain or to_v.in_features != block.dim or out.out_features != block.dim:
        return False
    wv, wo = to_v.weight.double(), out.weight.double()  # [inner, C], [C, inner]
    bv = to_v.bias.double() if to_v.bias is not None else torch.zeros(wv.shape[0], dtype=torch.float64, device=wv.device)
    bo = out.bias.double() if out.bias is not None else torch.zeros(wo.shape[0], dtype=torch.float64, device=wo.device)
    block.global_proj.weight.copy_(wo @ wv)  # [C, C]
    block.global_proj.bias.copy_(wo @ bv + bo)  # [C]
    return True


def attn_dim(attn: nn.Module, name: str) -> int:
    to_q, to_out = getattr(attn, "to_q", None), getattr(attn, "to_out", None)
    out = to_out[0] if isinstance(to_out, (nn.ModuleList, nn.Sequential)) else to_out
    if not isinstance(to_q, nn.Linear) or not isinstance(out, nn.Linear):
        raise ValueError(f"{name} is not a diffusers Attention with to_q/to_out Linear layers; cannot size its block")
    if to_q.in_features != out.out_features:
        raise ValueError(f"{name} maps {to_q.in_features} → {out.out_features} channels; a ΔConvBlock keeps C")
    return to_q.in_features


# ----------------------------------------------------------------------------------------------
# convert
# ----------------------------------------------------------------------------------------------


def convert(pipe, report_or_kernel_size=None, *, layers=None, gate: str | None = None, inter_ratio: float = 0.5,
            scales=(1, 0.5), init: str = "mean_field", kernel_ratio: float | None = None, gate_scale: float | None = None,
            pool: str | None = None, dw_bias: bool | None = None, preset: str | None = None, student: str = "deltaconv",
            key_width: int = 0):
    """Replace self-attention with ΔConvBlocks in place; returns ``pipe``.

    Args:
        pipe: a diffusers pipeline of a convertible family, or its denoiser.
        report_or_kernel_size: an odd int K ≥ 3 for every layer; a ``{module name or label: K}``
            dict; an ``erf.json`` path (or its folder); or a report from ``attnprobe.load_report``
            whose layer names must match this model.
        layers: which sites to convert: ``None`` (all), names/labels, or a predicate on the name.
        gate, gate_scale, pool, dw_bias, inter_ratio, scales: :class:`DeltaConvBlock` settings, shared
            by all layers (``None``: the preset's value).
        preset: ``"toolkit"`` (default) or ``"paper"`` (the official ΔConvFusion code for the model's
            family: gate, gate scale, pooling, depth-wise bias, and its kernel table when no kernel
            sizes are given), see :mod:`deltadistill.presets`.
        init: ``"mean_field"`` (global branch = teacher attention under uniform weights) or ``"zero"``.
        kernel_ratio: with a report, recompute its kernel sizes as odd(ceil(ratio · ERF)).
        student: ``"deltaconv"`` (the ΔConvBlock) or ``"linear"``: the baseline
            :class:`~deltadistill.linear_attention.LinearAttentionBlock` (LinFusion's form, projections
            copied from the teacher; kernel sizes and block settings do not apply).
        key_width: channels of each block's key-weighted branch (not in the paper; 0: none), see
            :class:`DeltaConvBlock`.

    Raises:
        ValueError: joint-attention models (FLUX, SD3), already converted models, bad kernel specs,
            models without self-attention.
    """
    from deltadistill.presets import block_settings, preset_kernel_sizes

    if init not in INITS:
        raise UserError(f"unknown init {init!r}; choose one of {INITS}")
    if student not in STUDENTS:
        raise UserError(f"unknown student {student!r}; choose one of {STUDENTS}")
    den, family, sites = convertible_sites(pipe)
    if student == "linear":
        from deltadistill.linear_attention import LinearAttentionBlock

        chosen = select(layers, sites)
        install(pipe, {s.name: LinearAttentionBlock.from_attention(s.module, s.name) for s in chosen},
                {"student": "linear", "kernel_source": None, "preset": preset or "toolkit"})
        return pipe
    block_kw = block_settings(preset, family, gate=gate, gate_scale=gate_scale, pool=pool, dw_bias=dw_bias)
    if report_or_kernel_size is None:
        report_or_kernel_size = preset_kernel_sizes(preset, family, sites)
    sizes, info = kernel_sizes(report_or_kernel_size, sites, den, kernel_ratio)
    info["preset"] = preset or "toolkit"
    chosen = select(layers, sites)
    missing = [s.name for s in chosen if s.name not in sizes]
    if missing:
        raise KernelSpecError(
            f"no kernel size for {len(missing)} layer(s), e.g. {missing[0]!r}; give every layer a size "
            "or restrict the conversion with layers=[...]"
        )
    blocks, mean_field = {}, []
    for site in chosen:
        block = DeltaConvBlock(attn_dim(site.module, site.name), sizes[site.name], scales=scales,
                               inter_ratio=inter_ratio, key_width=key_width, **block_kw)
        if init == "mean_field":
            mean_field.append(_mean_field_init(block, site.module))
        blocks[site.name] = block
    info["init"] = init if all(mean_field) else "zero" if not any(mean_field) else "mixed"
    install(pipe, blocks, info)
    return pipe


def convertible_sites(pipe) -> tuple[nn.Module, object, list]:
    """``(denoiser, family, sites)`` of a pipeline that may be converted; raises ValueError otherwise."""
    den = denoiser_of(pipe)
    if any(isinstance(m, DeltaConvAttention) for m in den.modules()):
        raise AlreadyConvertedError(
            f"{type(den).__name__} is already converted ({len(delta_modules(den))} ΔConvBlocks); "
            "convert a freshly loaded base pipeline (attnprobe.core.registry.load_pipeline), or use deltadistill.load"
        )
    family = family_of(den)
    if not family.convertible:
        ok = ", ".join(f.name for f in families() if f.convertible)
        raise UserError(
            f"{type(den).__name__} uses {family.not_convertible_reason or 'attention that cannot be replaced'}: its "
            "attention mixes text and image tokens and is the only place the prompt enters the image stream, so "
            f"replacing it with a convolution would drop the text conditioning. deltadistill converts {ok} models only"
        )
    try:
        sites = find_self_attention(den)
    except ValueError as exc:
        raise UserError(f"{exc}; nothing to convert (the model has no self-attention)") from None
    return den, family, sites


def install(pipe, blocks: Mapping[str, DeltaConvBlock], info: dict | None = None) -> nn.Module:
    """Put ready-made ``blocks`` ({site name: DeltaConvBlock}) in place of their self-attention.

    Moves each block to its site's device and dtype, registers the grid pre-hook, freezes every
    pipeline parameter except the blocks, and returns the denoiser. Used by :func:`convert` and
    :func:`deltadistill.io.load`.
    """
    den, family, sites = convertible_sites(pipe)
    by_name = {s.name: s for s in sites}
    unknown = [n for n in blocks if n not in by_name]
    if unknown:
        raise KernelSpecError(f"no self-attention named {unknown[0]!r} in {type(den).__name__}")
    recorder = GridRecorder(family)
    for name, block in blocks.items():
        site = by_name[name]
        ref = site.module.to_q.weight
        wrapper = DeltaConvAttention(block.to(device=ref.device, dtype=ref.dtype), site_name=name, label=site.label,
                                     family=family.name, level=site.level, recorder=recorder)
        parent_name, _, child = name.rpartition(".")
        setattr(den.get_submodule(parent_name) if parent_name else den, child, wrapper)

    den.register_forward_pre_hook(recorder, with_kwargs=True)
    den._deltadistill_recorder = recorder
    den._deltadistill_info = {**(info or {}), "family": family.name}

    # Freeze everything (all pipeline components), then unfreeze the blocks.
    modules = [den] + [v for v in (getattr(pipe, "components", None) or {}).values() if isinstance(v, nn.Module)]
    for mod in modules:
        mod.requires_grad_(False)
    for wrapper in delta_modules(den).values():
        wrapper.block.requires_grad_(True)
    return den
