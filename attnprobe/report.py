"""The ERF report (``erf.json``): accumulators, derived per-layer results, validation, merging.

A report stores, per layer, the *sums* the capture accumulated (ring masses per step bucket and
head, high-pass ring masses, total and positive high-pass mass, query-row counts, mass received
per key, probe maps). Everything users read (ASM curves, ERFs, kernel sizes, bias share, sink
keys) is derived from those sums by :class:`LayerResult`, so two reports of the same model and
settings merge exactly by adding their sums (:func:`merge_reports`).

Derived quantities (per layer; T step buckets, h heads, R rings):

* ``asm_curve[r]``: Σ_{t,h} ring[t,h,:r+1] / Σ ring — share of image-key mass in the (2r+1)² box.
* ``hp_asm_curve``: the same over the Butterworth high-passed maps (positive part, or abs).
* ``asm_gradient``: d ASM / dK = (ASM(K) − ASM(K−2)) / 2.
* ``erf``: smallest odd K with hp_asm_curve ≥ τ; also per head and per step bucket.
* ``kernel_size``: odd(ceil(ratio · ERF)) clamped to [kmin, kmax], with the report's default ratio;
  :meth:`LayerResult.kernel_size_for` / :meth:`Report.kernel_sizes` recompute it for any ratio.
* ``local_share`` = Σ Λ⁺ / Σ A (content/local term), ``bias_share`` = 1 − local_share
  (the query-independent low-pass prior).
* ``sink_keys``: keys receiving more than ``sink_factor`` × the mean mass per key.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attnprobe.core.errors import UserError
from attnprobe.core.outputs import atomic_write_text
from attnprobe.stats import (
    DEFAULT_KERNEL_RATIO,
    DEFAULT_KMAX,
    DEFAULT_KMIN,
    DEFAULT_THRESHOLD,
    asm_from_rings,
    effective_receptive_field,
    recommended_kernel_size,
)

SCHEMA = "attnprobe.erf"
SCHEMA_VERSION = 1

ACCUMULATORS = ("ring", "hp_ring", "mass", "hp_pos", "rows", "key_mass", "probe_maps", "probe_rows")

class ReportError(UserError):
    """The file is not a valid report (wrong schema, truncated, inconsistent)."""

def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]

@dataclass
class LayerResult:
    """One self-attention layer: its accumulators and everything derived from them."""

    name: str
    label: str
    grid: tuple[int, int]
    heads: int
    level: int
    joint: str | None
    ring: np.ndarray  # (T, heads, R)
    hp_ring: np.ndarray  # (T, heads, R)
    mass: np.ndarray  # (T, heads)
    hp_pos: np.ndarray  # (T, heads)
    rows: np.ndarray  # (T,)
    key_mass: np.ndarray  # (N,)
    probe_maps: np.ndarray  # (P, N)
    probe_rows: int
    settings: dict = field(repr=False, default_factory=dict)

    # -- derived ---------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.settings.get("threshold", DEFAULT_THRESHOLD))

    @property
    def radii(self) -> np.ndarray:
        return np.arange(self.ring.shape[-1])

    @property
    def k_axis(self) -> np.ndarray:
        """K = 2r + 1 for each ring index (the x axis of the ASM curves)."""
        return 2 * self.radii + 1

    @property
    def asm_curve(self) -> np.ndarray:
        return asm_from_rings(self.ring.sum((0, 1)))

    @property
    def hp_asm_curve(self) -> np.ndarray:
        return asm_from_rings(self.hp_ring.sum((0, 1)))

    @staticmethod
    def gradient(curve: np.ndarray) -> np.ndarray:
        """d ASM / dK with K = 2r+1 (so a step of one ring is ΔK = 2)."""
        return np.diff(curve, prepend=0.0) / 2.0

    @property
    def erf(self) -> int:
        return effective_receptive_field(self.hp_asm_curve, self.threshold) if self.hp_ring.sum() > 0 else 0

    @property
    def erf_unfiltered(self) -> int:
        return effective_receptive_field(self.asm_curve, self.threshold) if self.ring.sum() > 0 else 0

    @property
    def erf_per_head(self) -> list[int]:
        per = self.hp_ring.sum(0)
        return [effective_receptive_field(np.cumsum(p), self.threshold) if p.sum() > 0 else 0 for p in per]

    @property
    def erf_per_bucket(self) -> list[int]:
        per = self.hp_ring.sum(1)
        return [effective_receptive_field(np.cumsum(p), self.threshold) if p.sum() > 0 else 0 for p in per]

    @property
    def kernel_size(self) -> int:
        """The recommended ΔConvBlock kernel size with the report's default ratio and bounds."""
        return self.kernel_size_for()

    def kernel_size_for(self, ratio: float | None = None, kmin: int | None = None, kmax: int | None = None) -> int:
        """odd(ceil(ratio · ERF)) clamped to [kmin, kmax]; ``None`` takes the report's setting."""
        s = self.settings
        return recommended_kernel_size(
            max(self.erf, 1),
            float(s.get("kernel_ratio", DEFAULT_KERNEL_RATIO) if ratio is None else ratio),
            int(s.get("kmin", DEFAULT_KMIN) if kmin is None else kmin),
            int(s.get("kmax", DEFAULT_KMAX) if kmax is None else kmax),
        )

    @property
    def local_share(self) -> float:
        total = self.mass.sum()
        return float(self.hp_pos.sum() / total) if total > 0 else 0.0

    @property
    def bias_share(self) -> float:
        return 1.0 - self.local_share

    @property
    def sink_keys(self) -> list[int]:
        km = self.key_mass
        if km.sum() <= 0:
            return []
        factor = float(self.settings.get("sink_factor", 5.0))
        return [int(i) for i in np.nonzero(km > factor * km.mean())[0]]

    @property
    def has_sink(self) -> bool:
        return bool(self.sink_keys)

    @property
    def sink_share(self) -> float:
        """Fraction of all mass received by the flagged sink keys."""
        km = self.key_mass
        return float(km[self.sink_keys].sum() / km.sum()) if km.sum() > 0 and self.sink_keys else 0.0

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "label": self.label,
            "grid": list(self.grid),
            "heads": self.heads,
            "level": self.level,
            "joint": self.joint,
            "results": {
                "erf": self.erf,
                "erf_unfiltered": self.erf_unfiltered,
                "kernel_size": self.kernel_size,
                "kernel_sizes_axis": self.k_axis.tolist(),
                "asm_curve": _round(self.asm_curve),
                "asm_gradient": _round(self.gradient(self.asm_curve)),
                "hp_asm_curve": _round(self.hp_asm_curve),
                "hp_asm_gradient": _round(self.gradient(self.hp_asm_curve)),
                "erf_per_head": self.erf_per_head,
                "erf_per_bucket": self.erf_per_bucket,
                "bias_share": round(self.bias_share, 6),
                "local_share": round(self.local_share, 6),
                "sink_keys": self.sink_keys,
                "sink_share": round(self.sink_share, 6),
            },
            "accumulators": {
                "ring": self.ring.tolist(),
                "hp_ring": self.hp_ring.tolist(),
                "mass": self.mass.tolist(),
                "hp_pos": self.hp_pos.tolist(),
                "rows": self.rows.tolist(),
                "key_mass": self.key_mass.tolist(),
                "probe_maps": self.probe_maps.tolist(),
                "probe_rows": int(self.probe_rows),
            },
        }

    @classmethod
    def from_dict(cls, d: dict, settings: dict) -> "LayerResult":
        try:
            acc = d["accumulators"]
            grid = tuple(int(v) for v in d["grid"])
            layer = cls(
                name=str(d["name"]),
                label=str(d["label"]),
                grid=grid,
                heads=int(d["heads"]),
                level=int(d.get("level", 0)),
                joint=d.get("joint"),
                ring=np.asarray(acc["ring"], dtype=np.float64),
                hp_ring=np.asarray(acc["hp_ring"], dtype=np.float64),
                mass=np.asarray(acc["mass"], dtype=np.float64),
                hp_pos=np.asarray(acc["hp_pos"], dtype=np.float64),
                rows=np.asarray(acc["rows"], dtype=np.float64),
                key_mass=np.asarray(acc["key_mass"], dtype=np.float64),
                probe_maps=np.asarray(acc["probe_maps"], dtype=np.float64).reshape(-1, grid[0] * grid[1]),
                probe_rows=int(acc.get("probe_rows", 0)),
                settings=settings,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"layer {d.get('name', '?')!r} is malformed: {exc}") from None
        layer.validate()
        return layer

    def validate(self) -> None:
        t, h, r = self.ring.shape if self.ring.ndim == 3 else (None, None, None)
        n = self.grid[0] * self.grid[1]
        ok = (
            t is not None
            and h == self.heads
            and r == max(self.grid)
            and self.hp_ring.shape == self.ring.shape
            and self.mass.shape == (t, h)
            and self.hp_pos.shape == (t, h)
            and self.rows.shape == (t,)
            and self.key_mass.shape == (n,)
        )
        if not ok:
            raise ReportError(f"layer {self.name!r}: accumulator shapes do not match grid {self.grid} and {self.heads} heads")
        for key in ("ring", "hp_ring", "mass", "hp_pos", "key_mass", "probe_maps"):
            if not np.all(np.isfinite(getattr(self, key))):
                raise ReportError(f"layer {self.name!r}: accumulator {key!r} contains NaN or inf")

def _round(a: np.ndarray, digits: int = 6) -> list:
    return [round(float(v), digits) for v in np.asarray(a).ravel()]

@dataclass
class Report:
    """An ERF report: model, settings, run metadata and per-layer results."""

    model: dict
    settings: dict
    run: dict
    layers: list[LayerResult]
    images: list[str] = field(default_factory=list)

    def layer(self, name_or_label: str) -> LayerResult:
        for layer in self.layers:
            if name_or_label in (layer.name, layer.label):
                return layer
        raise KeyError(name_or_label)

    @property
    def threshold(self) -> float:
        return float(self.settings.get("threshold", DEFAULT_THRESHOLD))

    def kernel_sizes(self, ratio: float | None = None, kmin: int | None = None, kmax: int | None = None) -> dict[str, int]:
        """``{module name: recommended kernel size}`` — what deltadistill consumes.

        Recomputed from the stored sums; ``None`` takes the report's default ratio/bounds.
        """
        return {layer.name: layer.kernel_size_for(ratio, kmin, kmax) for layer in self.layers}

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "settings": self.settings,
            "run": self.run,
            "images": self.images,
            "highpass_note": (
                "ASM over the Butterworth high-passed maps uses the "
                + ("positive part" if self.settings.get("highpass_mass", "positive") == "positive" else "absolute value")
                + " of the filtered map, which sums to ~0 because the filter removes DC."
            ),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite)")
        atomic_write_text(path, json.dumps(self.to_dict(), separators=(",", ":")))
        return path

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ReportError("not an attnprobe ERF report (missing schema 'attnprobe.erf')")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReportError(
                f"report schema version {version} is not supported (this attnprobe reads version {SCHEMA_VERSION}); "
                "re-run `attnprobe analyze` to regenerate it"
            )
        for key in ("model", "settings", "run", "layers"):
            if key not in d:
                raise ReportError(f"report is missing {key!r}")
        _check_schema(d)
        settings = d["settings"]
        layers = [LayerResult.from_dict(ld, settings) for ld in d["layers"]]
        if not layers:
            raise ReportError("report has no layers")
        return cls(model=d["model"], settings=settings, run=d["run"], layers=layers, images=list(d.get("images", [])))

def _check_schema(d: dict) -> None:
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


def load_report(path: str | os.PathLike) -> Report:
    """Read and validate an ``erf.json`` (raises :class:`ReportError` with a clear message)."""
    path = Path(path)
    if path.is_dir():
        path = path / "erf.json"
    if not path.is_file():
        raise ReportError(f"no report at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}") from None
    return Report.from_dict(data)
