"""Replace the self-attention of a diffusion denoiser with ΔConvBlocks (SPEC §2).

``convert(pipe, K)`` swaps every self-attention module ``attn1`` of a PixArt-Σ/α, SD1.5/SDXL
UNet or DiT denoiser (as found by :func:`attnprobe.arch.find_self_attention`) for a
:class:`DeltaConvAttention`. The host transformer block calls it exactly like the original::

    out = attn1(norm_hidden_states, encoder_hidden_states=None, attention_mask=mask, **kwargs)
    #   [B, N, C]  →  tokens row-major on the H'×W' grid  →  DeltaConvBlock  →  [B, N, C]

so the host keeps its own norm, PixArt's adaLN shift/scale/gate, the residual, cross-attention
and feed-forward. Everything except the new blocks is frozen (``requires_grad_(False)``).

Token grid. The host only passes [B, N, C]; a non-square image cannot be recovered from N. A
forward pre-hook on the denoiser records the latent's spatial size (H_lat, W_lat) at every call,
and each wrapper knows its site: the base grid is (H_lat/p, W_lat/p) with p the patch size
(PixArt, DiT; 1 for UNets), and each UNet level halves it with ceil — the same rule as
:meth:`attnprobe.arch.AttnSite.grid`. If the wrapper is called outside a denoiser forward (or
the recorded grid does not hold N tokens) it falls back to a square grid, and raises if N is
not a square.

Initialisation. The blocks start with ``proj_out = 0`` (see :mod:`deltadistill.block`), and by
default (``init="mean_field"``) the global branch is set to the teacher's attention under
*uniform* attention weights: with A = 1/N, attention(z)_i = W_o (W_v z̄ + b_v) + b_o for every
query i, which is exactly a linear map of the token mean z̄ — the global branch's form — with
W = W_o W_v, b = W_o b_v + b_o. The converted model thus starts at the teacher with each
self-attention replaced by its mean-field (query-independent) value, and distillation only has
to learn the local, content-dependent remainder. ``init="zero"`` starts the global branch at 0.

Joint attention (FLUX, SD3) carries the text conditioning, so it is refused (ValueError).
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from attnprobe.arch import CONVERTIBLE, denoiser_of, detect_arch, find_self_attention
from attnprobe.registry import config_hash
from deltadistill.block import DeltaConvBlock

__all__ = [
    "convert",
    "delta_modules",
    "DeltaConvAttention",
    "AlreadyConvertedError",
    "KernelSpecError",
    "get_denoiser",
    "conversion_info",
    "convertible_sites",
    "install",
]

INITS = ("mean_field", "zero")


class AlreadyConvertedError(ValueError):
    """The denoiser already holds ΔConvBlocks."""


class KernelSpecError(ValueError):
    """The kernel sizes (int, dict or report) do not fit the model."""


# ----------------------------------------------------------------------------------------------
# Token-grid bookkeeping
# ----------------------------------------------------------------------------------------------


class LatentSizeRecorder:
    """Forward pre-hook on the denoiser: remembers the spatial size of its latent input.

    A callable object (not a closure) so that ``copy.deepcopy(denoiser)`` copies it together with
    the wrappers that point to it: a deep-copied student keeps a working, independent grid.
    """

    def __init__(self):
        self.latent_hw: tuple[int, int] | None = None

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        if torch.is_tensor(x) and x.ndim == 4:  # [B, C, H_lat, W_lat]
            self.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        return None


def _halve(hw: tuple[int, int], times: int) -> tuple[int, int]:
    h, w = hw
    for _ in range(times):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


class DeltaConvAttention(nn.Module):
    """Drop-in replacement for a self-attention module: ``[B, N, C] → [B, N, C]`` via a ΔConvBlock.

    Attributes: ``block`` (the trainable :class:`DeltaConvBlock`), ``site_name`` (qualified module
    name), ``label``, ``arch``, ``level`` (UNet halvings), ``patch`` (latent pixels per token).
    ``attention_mask`` and extra keyword arguments (e.g. ``cross_attention_kwargs``) are accepted
    and ignored: a convolution over the full grid has no key mask.
    """

    def __init__(
        self,
        block: DeltaConvBlock,
        *,
        site_name: str,
        label: str,
        arch: str,
        level: int = 0,
        patch: int = 1,
        recorder: LatentSizeRecorder | None = None,
    ):
        super().__init__()
        self.block = block
        self.site_name, self.label, self.arch = site_name, label, arch
        self.level, self.patch = int(level), int(patch)
        self.recorder = recorder

    def extra_repr(self) -> str:
        return f"site={self.site_name!r}, level={self.level}, patch={self.patch}"

    def token_grid(self, n_tokens: int) -> tuple[int, int]:
        """(H', W') with H'·W' = ``n_tokens`` for the current call (see module docstring)."""
        hw = self.recorder.latent_hw if self.recorder is not None else None
        if hw is not None:
            grid = _halve((hw[0] // self.patch, hw[1] // self.patch), self.level)
            if grid[0] * grid[1] == n_tokens:
                return grid
        side = math.isqrt(n_tokens)
        if side * side == n_tokens:
            return side, side
        raise ValueError(
            f"{self.site_name}: cannot place {n_tokens} tokens on a grid (recorded latent size {hw}, "
            f"patch {self.patch}, level {self.level}); call it through the denoiser's forward so the "
            "latent size is recorded, or use a square token count"
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
        dtype = self.block.proj_in.weight.dtype
        z = hidden_states.reshape(b, h, w, c)  # [B, N, C] → [B, H', W', C], row-major
        if z.dtype != dtype and not torch.is_autocast_enabled(z.device.type):
            z = z.to(dtype)  # e.g. fp32 master blocks inside a bf16 frozen model
        out = self.block(z)  # [B, H', W', C]
        return out.reshape(b, n, c).to(hidden_states.dtype)  # [B, N, C]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def get_denoiser(pipe_or_denoiser) -> nn.Module:
    """The denoiser of a pipeline, or the argument itself when it already is a denoiser.

    DDP / DataParallel wrappers (``.module``) and ``torch.compile`` wrappers (``._orig_mod``) are
    unwrapped, so module names never carry a ``module.`` prefix.
    """
    while isinstance(pipe_or_denoiser, nn.Module):
        inner = getattr(pipe_or_denoiser, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(
            pipe_or_denoiser, (nn.DataParallel, nn.parallel.DistributedDataParallel)
        ):
            inner = pipe_or_denoiser.module
        if not isinstance(inner, nn.Module):
            break
        pipe_or_denoiser = inner
    if isinstance(pipe_or_denoiser, nn.Module):
        if isinstance(getattr(pipe_or_denoiser, "transformer", None), nn.Module) or isinstance(
            getattr(pipe_or_denoiser, "unet", None), nn.Module
        ):
            return denoiser_of(pipe_or_denoiser)
        return pipe_or_denoiser
    return denoiser_of(pipe_or_denoiser)


def delta_modules(denoiser) -> dict[str, DeltaConvAttention]:
    """``{qualified module name: DeltaConvAttention}`` of a converted denoiser (or pipeline), in order."""
    den = get_denoiser(denoiser)
    return {name: mod for name, mod in den.named_modules() if isinstance(mod, DeltaConvAttention)}


def conversion_info(denoiser) -> dict:
    """What :func:`convert` recorded on the denoiser (kernel source, report hash); ``{}`` if none."""
    return dict(getattr(get_denoiser(denoiser), "_deltadistill_info", {}) or {})


def _check_kernel(k, where: str) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise KernelSpecError(f"kernel size for {where} must be an int, got {k!r}") from None
    if k < 3 or k % 2 == 0:
        raise KernelSpecError(f"kernel size for {where} must be odd and >= 3, got {k}")
    return k


def _resolve_names(keys: Iterable[str], sites, what: str) -> list[str]:
    """Map qualified names or labels to qualified names; unknown keys raise, naming a few valid ones."""
    by_name = {s.name: s.name for s in sites}
    by_label = {s.label: s.name for s in sites}
    out, unknown = [], []
    for key in keys:
        name = by_name.get(key) or by_label.get(key)
        (out if name else unknown).append(name or key)
    if unknown:
        examples = ", ".join(s.name for s in sites[:3])
        raise KernelSpecError(
            f"{what} names {len(unknown)} layer(s) not in this model: {', '.join(map(repr, unknown[:5]))}"
            f"{' ...' if len(unknown) > 5 else ''}; use qualified module names such as {examples} (or their labels)"
        )
    return out


def _report_hash(report) -> str:
    """Content hash of what a report contributes: its model identity and per-layer kernel sizes."""
    model = getattr(report, "model", {}) or {}
    blob = {
        "model": {k: model.get(k) for k in ("alias", "source", "config_hash")},
        "layers": [[layer.name, int(layer.kernel_size)] for layer in report.layers],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _load_report(spec):
    path = Path(spec)
    if path.is_dir():
        path = path / "erf.json"
    if not path.is_file():
        raise KernelSpecError(f"no report at {path}; run `attnprobe analyze` first or pass a kernel size (int)")
    from attnprobe import load_report

    return load_report(path)


def _kernel_sizes(spec, sites, den) -> tuple[dict[str, int], dict]:
    """Normalise ``report_or_kernel_size`` to ``{qualified name: K}`` plus provenance info."""
    if isinstance(spec, bool):
        raise KernelSpecError("kernel size must be an odd int >= 3, a {layer: K} dict, or an erf.json report")
    if isinstance(spec, int) or (hasattr(spec, "__index__") and not isinstance(spec, (str, os.PathLike))):
        k = _check_kernel(spec, "all layers")
        return {s.name: k for s in sites}, {"kernel_source": "int"}
    if isinstance(spec, Mapping):
        names = _resolve_names(list(spec), sites, "the kernel-size dict")
        return {n: _check_kernel(spec[key], n) for n, key in zip(names, spec)}, {"kernel_source": "dict"}
    if isinstance(spec, (str, os.PathLike)):
        spec = _load_report(spec)
    if not hasattr(spec, "layers"):
        raise KernelSpecError(
            f"cannot read kernel sizes from {type(spec).__name__}; pass an odd int, a {{layer name: K}} dict, "
            "an erf.json path or a report from attnprobe.load_report"
        )
    report_names = [layer.name for layer in spec.layers]
    model_names = [s.name for s in sites]
    missing = [n for n in model_names if n not in set(report_names)]
    extra = [n for n in report_names if n not in set(model_names)]
    model = dict(getattr(spec, "model", {}) or {})
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"{len(missing)} model layer(s) missing from the report (e.g. {missing[0]!r})")
        if extra:
            detail.append(f"{len(extra)} report layer(s) not in the model (e.g. {extra[0]!r})")
        raise KernelSpecError(
            f"the report was measured on another model ({model.get('alias', '?')}): {'; '.join(detail)}; "
            "re-run `attnprobe analyze` on this model or pass kernel sizes explicitly"
        )
    theirs = model.get("denoiser") or model.get("arch")
    ours = type(den).__name__ if model.get("denoiser") else detect_arch(den)
    if theirs and theirs != ours:
        raise KernelSpecError(
            f"the report was measured on a {theirs} model ({model.get('alias', '?')}), not this {ours}; "
            "re-run `attnprobe analyze` on this model or pass kernel sizes explicitly"
        )
    want = model.get("config_hash")
    have = config_hash(den.config)
    if want and want != have:
        warnings.warn(
            f"report config hash {want} differs from this denoiser's {have} (same layer names, other config, "
            f"e.g. another resolution variant of {model.get('alias', 'the model')}); using its kernel sizes anyway",
            stacklevel=3,
        )
    sizes = {layer.name: _check_kernel(layer.kernel_size, layer.name) for layer in spec.layers}
    info = {
        "kernel_source": "report",
        "report_hash": _report_hash(spec),
        "report_model": {k: model.get(k) for k in ("alias", "source", "config_hash")},
    }
    return sizes, info


def _select(layers, sites) -> list:
    if layers is None:
        return list(sites)
    if callable(layers):
        chosen = [s for s in sites if layers(s.name)]
    else:
        if isinstance(layers, str):
            layers = [layers]
        names = set(_resolve_names(list(layers), sites, "`layers`"))
        chosen = [s for s in sites if s.name in names]
    if not chosen:
        raise KernelSpecError("`layers` selects no self-attention layer; see attnprobe.arch.find_self_attention")
    return chosen


def _patch_size(arch: str, den: nn.Module) -> int:
    return 1 if arch == "unet" else int(den.config.patch_size)


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


def _attn_dim(attn: nn.Module, name: str) -> int:
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


def convert(
    pipe,
    report_or_kernel_size,
    *,
    layers=None,
    gate: str = "scaled",
    inter_ratio: float = 0.5,
    scales=(1, 0.5),
    init: str = "mean_field",
):
    """Replace self-attention with ΔConvBlocks in place; returns ``pipe``.

    Args:
        pipe: a diffusers pipeline (PixArt-Σ/α, SD1.5, SDXL, DiT) or its denoiser.
        report_or_kernel_size: an odd int K ≥ 3 for every layer; a ``{module name or label: K}``
            dict; an ``erf.json`` path (or its folder); or a report from ``attnprobe.load_report``
            whose layer names must match this model.
        layers: which sites to convert: ``None`` (all), names/labels, or a predicate on the name.
        gate, inter_ratio, scales: :class:`DeltaConvBlock` settings, shared by all layers.
        init: ``"mean_field"`` (global branch = teacher attention under uniform weights) or ``"zero"``.

    Raises:
        ValueError: joint-attention models (FLUX, SD3), already converted models, bad kernel specs,
            models without self-attention.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    den, arch, sites = convertible_sites(pipe)
    sizes, info = _kernel_sizes(report_or_kernel_size, sites, den)
    chosen = _select(layers, sites)
    missing = [s.name for s in chosen if s.name not in sizes]
    if missing:
        raise KernelSpecError(
            f"no kernel size for {len(missing)} layer(s), e.g. {missing[0]!r}; give every layer a size "
            "or restrict the conversion with layers=[...]"
        )
    blocks, mean_field = {}, []
    for site in chosen:
        dim = _attn_dim(site.module, site.name)
        block = DeltaConvBlock(dim, sizes[site.name], scales=scales, inter_ratio=inter_ratio, gate=gate)
        if init == "mean_field":
            mean_field.append(_mean_field_init(block, site.module))
        blocks[site.name] = block
    info["init"] = init if all(mean_field) else "zero" if not any(mean_field) else "mixed"
    install(pipe, blocks, info)
    return pipe


def convertible_sites(pipe) -> tuple[nn.Module, str, list]:
    """``(denoiser, arch, sites)`` of a pipeline that may be converted; raises ValueError otherwise."""
    den = get_denoiser(pipe)
    if any(isinstance(m, DeltaConvAttention) for m in den.modules()):
        raise AlreadyConvertedError(
            f"{type(den).__name__} is already converted ({len(delta_modules(den))} ΔConvBlocks); "
            "convert a freshly loaded base pipeline (attnprobe.registry.load_pipeline), or use deltadistill.load"
        )
    arch = detect_arch(den)
    if arch in ("flux", "sd3"):
        raise ValueError(
            f"{type(den).__name__} uses joint attention: its attention mixes text and image tokens and is the "
            "only place the prompt enters the image stream, so replacing it with a convolution would drop the "
            f"text conditioning. deltadistill converts {', '.join(CONVERTIBLE)} models only"
        )
    if arch not in CONVERTIBLE:
        raise ValueError(f"{arch} models cannot be converted; supported: {', '.join(CONVERTIBLE)}")
    try:
        sites = find_self_attention(den)
    except ValueError as exc:
        raise ValueError(f"{exc}; nothing to convert (the model has no self-attention)") from None
    return den, arch, sites


def install(pipe, blocks: Mapping[str, DeltaConvBlock], info: dict | None = None) -> nn.Module:
    """Put ready-made ``blocks`` ({site name: DeltaConvBlock}) in place of their self-attention.

    Moves each block to its site's device and dtype, registers the latent-size pre-hook, freezes
    every pipeline parameter except the blocks, and returns the denoiser. Used by :func:`convert`
    and :func:`deltadistill.io.load`.
    """
    den, arch, sites = convertible_sites(pipe)
    by_name = {s.name: s for s in sites}
    unknown = [n for n in blocks if n not in by_name]
    if unknown:
        raise KernelSpecError(f"no self-attention named {unknown[0]!r} in {type(den).__name__}")
    patch = _patch_size(arch, den)
    recorder = LatentSizeRecorder()
    for name, block in blocks.items():
        site = by_name[name]
        ref = site.module.to_q.weight
        block = block.to(device=ref.device, dtype=ref.dtype)
        wrapper = DeltaConvAttention(
            block, site_name=name, label=site.label, arch=arch, level=site.level, patch=patch, recorder=recorder
        )
        parent_name, _, child = name.rpartition(".")
        parent = den.get_submodule(parent_name) if parent_name else den
        setattr(parent, child, wrapper)

    den.register_forward_pre_hook(recorder, with_kwargs=True)
    den._deltadistill_recorder = recorder
    den._deltadistill_info = {**(info or {}), "arch": arch}

    # Freeze everything (all pipeline components), then unfreeze the blocks.
    modules = [den]
    for value in (getattr(pipe, "components", None) or {}).values():
        if isinstance(value, nn.Module):
            modules.append(value)
    for mod in modules:
        mod.requires_grad_(False)
    for wrapper in delta_modules(den).values():
        wrapper.block.requires_grad_(True)
    return den
