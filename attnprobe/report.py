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

from attnprobe.core.outputs import atomic_write_text
from attnprobe.report_schema import ReportError, check_layer, check_schema, mean_map_from  # ReportError is re-exported
from attnprobe.estimators import GLOBAL_SHARE, asm_margin, bootstrap_erf, far_radii, key_coverage, prior_share
from attnprobe.stats import (DEFAULT_KERNEL_RATIO, DEFAULT_KMAX, DEFAULT_KMIN, DEFAULT_THRESHOLD, asm_from_rings,
                             effective_receptive_field, parse_queries, recommended_kernel_size)

SCHEMA = "attnprobe.erf"
SCHEMA_VERSION = 1

ACCUMULATORS = ("ring", "hp_ring", "mass", "hp_pos", "rows", "key_mass", "probe_maps", "probe_rows")


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
    far_key_mass: np.ndarray | None = None  # (F, N): mass key k receives from queries beyond far_radii[f]
    far_rows: np.ndarray | None = None  # (F, N): how many rows were that far
    prompt_hp_ring: np.ndarray | None = None  # (P, R): high-pass rings per prompt (summed over heads and steps)
    mean_map: dict | None = None  # --aggregate mean-map: bucket_rings (T, R), rings (R,), hp_mass, interval, groups

    @property
    def aggregate(self) -> str:
        return "mean-map" if self.mean_map is not None else "per-map"

    def _hp_total(self) -> np.ndarray:
        """(R,) high-pass rings the ERF is read from (per-map sums, or the aggregated map's)."""
        return np.asarray(self.mean_map["rings"], float) if self.mean_map is not None else self.hp_ring.sum((0, 1))

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
        return asm_from_rings(self._hp_total())

    @staticmethod
    def gradient(curve: np.ndarray) -> np.ndarray:
        """d ASM / dK with K = 2r+1 (so a step of one ring is ΔK = 2)."""
        return np.diff(curve, prepend=0.0) / 2.0

    @property
    def erf(self) -> int:
        """Smallest odd K with high-pass ASM ≥ τ; 0 for a global layer (no ERF)."""
        if self._hp_total().sum() <= 0 or self.is_global:
            return 0
        return effective_receptive_field(self.hp_asm_curve, self.threshold)

    @property
    def erf_unfiltered(self) -> int:
        return effective_receptive_field(self.asm_curve, self.threshold) if self.ring.sum() > 0 else 0

    @property
    def erf_per_head(self) -> list[int]:
        """Per head, always from the per-map sums (the mean map is averaged over heads)."""
        per = self.hp_ring.sum(0)
        return [effective_receptive_field(np.cumsum(p), self.threshold) if p.sum() > 0 else 0 for p in per]

    @property
    def erf_per_bucket(self) -> list[int]:
        per = np.asarray(self.mean_map["bucket_rings"], float) if self.mean_map is not None else self.hp_ring.sum(1)
        return [effective_receptive_field(np.cumsum(p), self.threshold) if p.sum() > 0 else 0 for p in per]

    @property
    def kernel_size(self) -> int:
        """The recommended ΔConvBlock kernel size with the report's default ratio and bounds."""
        return self.kernel_size_for()

    def kernel_size_for(self, ratio: float | None = None, kmin: int | None = None, kmax: int | None = None,
                        erf_from: str | None = None) -> int:
        """odd(ceil(ratio · ERF)) clamped to [kmin, kmax]; ``None`` takes the report's setting.

        ``erf_from``: ``"upper"`` (default) sizes from the upper end of the ERF's bootstrap interval,
        ``"point"`` from the ERF itself. A global layer gets kmax, never the smallest kernel.
        """
        s = self.settings
        kmax_ = int(s.get("kmax", DEFAULT_KMAX) if kmax is None else kmax)
        if self.is_global:
            return recommended_kernel_size(10**6, 1.0, 3, kmax_)  # the largest odd kernel ≤ kmax
        erf = self.erf
        interval = self.erf_interval if (erf_from or s.get("erf_from", "upper")) == "upper" else None
        if interval is not None:
            erf = max(erf, interval[1])
        return recommended_kernel_size(
            max(erf, 1),
            float(s.get("kernel_ratio", DEFAULT_KERNEL_RATIO) if ratio is None else ratio),
            int(s.get("kmin", DEFAULT_KMIN) if kmin is None else kmin),
            kmax_,
        )

    @property
    def highpass_share(self) -> float:
        """Σ Λ⁺ / Σ A: the share of mass left positive by the high-pass filter (not a prior share)."""
        total = self.mass.sum()
        hp = float(self.mean_map["hp_mass"]) if self.mean_map is not None else self.hp_pos.sum()
        return float(hp / total) if total > 0 else 0.0

    @property
    def is_global(self) -> bool:
        """Negligible high-pass mass: the layer attends globally and has no ERF."""
        return self.highpass_share < float(self.settings.get("global_share", GLOBAL_SHARE)) or self._hp_total().sum() <= 0

    @property
    def bias_share(self) -> float:
        """Share of the mass explained by a query-independent prior (see :func:`attnprobe.stats.prior_share`)."""
        if self.far_key_mass is None:
            return float("nan")
        mass_per_row = self.mass.sum() / max(self.rows.sum() * self.heads, 1)  # image-key mass of one row (≤ 1)
        reach = (self.erf - 1) // 2 + 1 if self.erf > 0 else 1
        share = prior_share(self.far_key_mass, self.far_rows, far_radii(self.grid), reach)
        return float(share / mass_per_row) if mass_per_row > 0 else float("nan")

    @property
    def local_share(self) -> float:
        """1 − bias share: what the local, query-dependent term explains."""
        return 1.0 - self.bias_share

    @property
    def erf_interval(self) -> tuple[int, int] | None:
        """90% bootstrap interval of the ERF over prompts (mean-map: prompt groups); None with fewer than two."""
        if self.is_global:
            return None
        if self.mean_map is not None:
            iv = self.mean_map.get("interval")
            return tuple(int(v) for v in iv) if iv else None
        if self.prompt_hp_ring is None:
            return None
        return bootstrap_erf(self.prompt_hp_ring, self.threshold)

    @property
    def erf_interval_steps(self) -> tuple[int, int] | None:
        """90% bootstrap interval of the ERF over resampled timestep buckets (per-map; None with one bucket)."""
        if self.is_global or self.mean_map is not None or self.hp_ring.shape[0] < 2:
            return None
        return bootstrap_erf(self.hp_ring.sum(1), self.threshold)

    @property
    def asm_margin(self) -> float:
        """min(ASM(ERF) − τ, τ − ASM(ERF − 2)) of the high-pass curve: small means the ERF sits on a knife edge."""
        return asm_margin(self.hp_asm_curve, self.erf, self.threshold) if not self.is_global else float("nan")

    @property
    def key_coverage(self) -> np.ndarray:
        """(N,) mass each key would receive from the sampled queries if they spread the layer's mean ring
        profile evenly (see :func:`attnprobe.stats.key_coverage`)."""
        pos = parse_queries(self.settings.get("queries", "all"), self.grid).numpy()
        return key_coverage(self.ring.sum((0, 1)), self.key_mass.sum(), self.grid, pos)

    @property
    def key_mass_ratio(self) -> np.ndarray:
        """(N,) key mass / key coverage: 1 where a key gets what its distance to the sampled queries predicts;
        free of the query lattice's pattern and of border effects. Sinks stand out as ≫ 1."""
        cov = self.key_coverage
        return np.divide(self.key_mass, cov, out=np.zeros_like(cov), where=cov > 0)

    @property
    def sink_keys(self) -> list[int]:
        """Keys receiving more than sink_factor × what their coverage predicts (see :attr:`key_mass_ratio`)."""
        if self.key_mass.sum() <= 0:
            return []
        factor = float(self.settings.get("sink_factor", 5.0))
        return [int(i) for i in np.nonzero(self.key_mass_ratio > factor)[0]]

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
                "global": bool(self.is_global),
                "aggregate": self.aggregate,
                "erf_interval": list(self.erf_interval) if self.erf_interval else None,
                "erf_interval_steps": list(self.erf_interval_steps) if self.erf_interval_steps else None,
                "asm_margin": _r(self.asm_margin),
                "bias_share": _r(self.bias_share),
                "local_share": _r(self.local_share),
                "highpass_share": round(self.highpass_share, 6),
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
                **({} if self.far_key_mass is None else {"far_key_mass": self.far_key_mass.tolist(),
                                                         "far_rows": self.far_rows.tolist()}),
                **({} if self.prompt_hp_ring is None else {"prompt_hp_ring": self.prompt_hp_ring.tolist()}),
                **({} if self.mean_map is None else {"mean_map": {
                    "bucket_rings": np.asarray(self.mean_map["bucket_rings"]).tolist(),
                    "rings": np.asarray(self.mean_map["rings"]).tolist(),
                    "hp_mass": float(self.mean_map["hp_mass"]),
                    "interval": list(self.mean_map["interval"]) if self.mean_map.get("interval") else None,
                    "groups": int(self.mean_map.get("groups", 1)),
                }}),
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
                far_key_mass=np.asarray(acc["far_key_mass"], dtype=np.float64) if "far_key_mass" in acc else None,
                far_rows=np.asarray(acc["far_rows"], dtype=np.float64) if "far_rows" in acc else None,
                prompt_hp_ring=np.asarray(acc["prompt_hp_ring"], dtype=np.float64) if "prompt_hp_ring" in acc else None,
                mean_map=mean_map_from(acc.get("mean_map")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"layer {d.get('name', '?')!r} is malformed: {exc}") from None
        layer.validate()
        return layer

    def validate(self) -> None:
        """Shapes and finiteness of every accumulator (raises :class:`ReportError` naming the layer)."""
        check_layer(self)

def _r(v: float, digits: int = 6):
    return None if v is None or not np.isfinite(v) else round(float(v), digits)


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
        check_schema(d)
        settings = d["settings"]
        settings.setdefault("border", "circular")  # reports before --border wrapped the FFT
        settings.setdefault("aggregate", "per-map")
        settings.setdefault("erf_from", "point")
        layers = [LayerResult.from_dict(ld, settings) for ld in d["layers"]]
        if not layers:
            raise ReportError("report has no layers")
        return cls(model=d["model"], settings=settings, run=d["run"], layers=layers, images=list(d.get("images", [])))

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
