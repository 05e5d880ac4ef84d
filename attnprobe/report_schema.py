"""Validation of reports: the JSON schema a report file must follow and the shapes of a layer's sums.

Kept apart from :mod:`attnprobe.report` (which derives the statistics) so that each stays short.
"""
from __future__ import annotations

import numpy as np

from attnprobe.core.errors import UserError
from attnprobe.estimators import far_radii

__all__ = ["ReportError", "check_schema", "check_layer", "mean_map_from"]


class ReportError(UserError):
    """The file is not a valid report (wrong schema, truncated, inconsistent)."""


def check_schema(d: dict) -> None:
    """Types and ranges of the fields everything else relies on; the message names the field."""
    def need(ok, field, what):
        if not ok:
            raise ReportError(f"report field {field!r} {what}")

    for key in ("model", "settings", "run"):
        need(isinstance(d[key], dict), key, f"must be an object, got {type(d[key]).__name__}")
    need(isinstance(d["layers"], list), "layers", "must be a list")
    for i, layer in enumerate(d["layers"]):
        need(isinstance(layer, dict), f"layers[{i}]", f"must be an object, got {type(layer).__name__}")
    s = d["settings"]
    res = s.get("resolution")
    need(isinstance(res, list) and len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res), "settings.resolution",
         f"must be [height, width] in pixels, got {res!r}")
    for key, lo in (("threshold", 0.0), ("kernel_ratio", 0.0), ("cutoff", 0.0), ("sink_factor", 1.0)):
        if key in s:
            v = s[key]
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > lo,
                 f"settings.{key}", f"must be a number > {lo:g}, got {v!r}")
    if "threshold" in s:
        need(s["threshold"] <= 1, "settings.threshold", f"must be at most 1, got {s['threshold']!r}")
    for key in ("kmin", "kmax", "steps"):
        if key in s:
            need(isinstance(s[key], int) and not isinstance(s[key], bool) and s[key] >= 1, f"settings.{key}",
                 f"must be a positive integer, got {s[key]!r}")
    if "prompts" in s:
        need(isinstance(s["prompts"], list) and all(isinstance(p, str) for p in s["prompts"]), "settings.prompts",
             "must be a list of strings")
    need(isinstance(d.get("images", []), list) and all(isinstance(v, str) for v in d.get("images", [])), "images",
         "must be a list of file names")


def check_layer(layer) -> None:
    """Shapes and finiteness of a LayerResult's accumulators; the message names the layer."""
    t, h, r = layer.ring.shape if layer.ring.ndim == 3 else (None, None, None)
    n = layer.grid[0] * layer.grid[1]
    ok = (
        t is not None
        and h == layer.heads
        and r == max(layer.grid)
        and layer.hp_ring.shape == layer.ring.shape
        and layer.mass.shape == (t, h)
        and layer.hp_pos.shape == (t, h)
        and layer.rows.shape == (t,)
        and layer.key_mass.shape == (n,)
    )
    if not ok:
        raise ReportError(f"layer {layer.name!r}: accumulator shapes do not match grid {layer.grid} and {layer.heads} heads")
    f = len(far_radii(layer.grid))
    if layer.far_key_mass is not None and (layer.far_key_mass.shape != (f, n) or layer.far_rows.shape != (f, n)):
        raise ReportError(f"layer {layer.name!r}: far-field accumulators do not match grid {layer.grid}")
    if layer.prompt_hp_ring is not None and (layer.prompt_hp_ring.ndim != 2 or layer.prompt_hp_ring.shape[1] != r):
        raise ReportError(f"layer {layer.name!r}: per-prompt rings do not match grid {layer.grid}")
    if layer.mean_map is not None:
        mm = layer.mean_map
        if mm["rings"].shape != (r,) or mm["bucket_rings"].ndim != 2 or mm["bucket_rings"].shape[1] != r:
            raise ReportError(f"layer {layer.name!r}: mean-map rings do not match grid {layer.grid}")
        if not (np.all(np.isfinite(mm["rings"])) and np.all(np.isfinite(mm["bucket_rings"]))):
            raise ReportError(f"layer {layer.name!r}: mean-map rings contain NaN or inf")
    for key in ("ring", "hp_ring", "mass", "hp_pos", "key_mass", "probe_maps"):
        if not np.all(np.isfinite(getattr(layer, key))):
            raise ReportError(f"layer {layer.name!r}: accumulator {key!r} contains NaN or inf")


def mean_map_from(d) -> dict | None:
    """The ``mean_map`` accumulator of a layer as read from JSON (arrays as numpy)."""
    if d is None:
        return None
    return {"bucket_rings": np.asarray(d["bucket_rings"], dtype=np.float64), "rings": np.asarray(d["rings"], dtype=np.float64),
            "hp_mass": float(d["hp_mass"]), "interval": tuple(d["interval"]) if d.get("interval") else None,
            "groups": int(d.get("groups", 1))}
