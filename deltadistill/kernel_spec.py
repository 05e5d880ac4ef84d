"""Kernel sizes for a conversion: one int, a ``{layer: K}`` dict, or an ``erf.json`` report.

:func:`kernel_sizes` normalises any of them to ``{qualified module name: K}`` for the sites of a
denoiser, checking that a report was measured on this model (same layer names, same family,
same config hash — a differing hash only warns) and recomputing the report's sizes for a
``kernel_ratio`` when one is given (:meth:`attnprobe.report.Report.kernel_sizes`).
"""
from __future__ import annotations

import hashlib
import json
import operator
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from attnprobe.core.errors import UserError
from attnprobe.core.family import family_of
from attnprobe.core.registry import config_hash

__all__ = ["KernelSpecError", "kernel_sizes", "select", "check_kernels_fit", "MAX_KERNEL"]

MAX_KERNEL = 63  # a sane upper bound; a layer's kernel is also bounded by its grid (see conversion)


class KernelSpecError(UserError):
    """The kernel sizes (int, dict or report) do not fit the model."""


def _check_kernel(k, where: str) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise KernelSpecError(f"kernel size for {where} must be an int, got {k!r}") from None
    if k < 3 or k % 2 == 0:
        raise KernelSpecError(f"kernel size for {where} must be odd and >= 3, got {k}")
    if k > MAX_KERNEL:
        raise KernelSpecError(f"kernel size for {where} is {k}; at most {MAX_KERNEL} is supported")
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


def _report_hash(report, sizes: dict[str, int]) -> str:
    """Content hash of what a report contributes: its model identity and per-layer kernel sizes."""
    model = getattr(report, "model", {}) or {}
    blob = {
        "model": {k: model.get(k) for k in ("alias", "source", "config_hash")},
        "layers": [[name, int(k)] for name, k in sizes.items()],
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


def kernel_sizes(spec, sites, den, kernel_ratio: float | None = None) -> tuple[dict[str, int], dict]:
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
    theirs = model.get("denoiser") or model.get("family") or model.get("arch")
    ours = type(den).__name__ if model.get("denoiser") else family_of(den).name
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
    if kernel_ratio is None:  # the report's own recommendation
        raw = {layer.name: layer.kernel_size for layer in spec.layers}
    else:
        raw = spec.kernel_sizes(ratio=kernel_ratio)
    sizes = {name: _check_kernel(k, name) for name, k in raw.items()}
    info = {
        "kernel_source": "report",
        "report_hash": _report_hash(spec, sizes),
        "report_model": {k: model.get(k) for k in ("alias", "source", "config_hash")},
    }
    return sizes, info


def select(layers, sites) -> list:
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
        raise KernelSpecError("`layers` selects no self-attention layer; see attnprobe.core.family.find_self_attention")
    return chosen


def check_kernels_fit(sizes: dict[str, int], sites, base_grid: tuple[int, int], resolution: int) -> None:
    """Raise KernelSpecError when a kernel is wider than its layer's grid can use (2·max(H′, W′) − 1)."""
    for site in sites:
        grid, k = site.grid(base_grid), sizes.get(site.name)
        if k is not None and k > 2 * max(grid) - 1:
            raise KernelSpecError(f"kernel size {k} for {site.label} exceeds its {grid[0]}×{grid[1]} token grid at "
                                  f"{resolution} px (at most {2 * max(grid) - 1} is useful); pass a smaller --kernel-size")
