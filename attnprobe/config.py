"""``AnalysisConfig``: every setting of an analysis, validated once, stored in the report.

The CLI (``attnprobe analyze``) and the Python API (:func:`attnprobe.analyze`) build the same
object; :meth:`AnalysisConfig.validate` is the only place that checks the values, before any
model is loaded. The report keeps :meth:`AnalysisConfig.settings` (plus what the run derived:
pixel size, seeds, prompts) so that merges can tell whether two runs are comparable.

``kernel_ratio``/``kmin``/``kmax`` are only the report's *default* recommendation: kernel sizes
are a pure function of the stored sums, and :meth:`attnprobe.report.Report.kernel_sizes` recomputes
them for any ratio.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import re

from attnprobe.core import backends
from attnprobe.core.pipeline import MAX_SIDE, parse_resolution
from attnprobe.core.errors import UserError
from attnprobe.estimators import AGGREGATES
from attnprobe.stats import (
    BORDERS,
    DEFAULT_KERNEL_RATIO,
    DEFAULT_KMAX,
    DEFAULT_KMIN,
    DEFAULT_THRESHOLD,
    parse_queries,
)

__all__ = ["AnalysisConfig", "ConfigError", "DEFAULT_PROBE_POINTS"]

DEFAULT_PROBE_POINTS = ((0.5, 0.5), (0.25, 0.25), (0.25, 0.75), (0.75, 0.5))


class ConfigError(UserError):
    """An analysis setting is out of range; the message names the option."""


@dataclass(frozen=True)
class AnalysisConfig:
    """Settings of one ``analyze`` run (the options of ``attnprobe analyze``)."""

    resolution: object = None  # None (the model's), N, "HxW" or (H, W) pixels
    steps: int = 20
    guidance_scale: float | None = None
    seed: int = 0
    threshold: float = DEFAULT_THRESHOLD
    cutoff: float = 0.1
    order: int = 2
    highpass_mass: str = "positive"
    kernel_ratio: float = DEFAULT_KERNEL_RATIO
    kmin: int = DEFAULT_KMIN
    kmax: int = DEFAULT_KMAX
    queries: str = "auto"
    layers: str | None = None
    timestep_buckets: int = 4
    probe_points: tuple | None = None  # None: DEFAULT_PROBE_POINTS; () none
    sink_factor: float = 5.0
    memory_budget_mb: float = 256
    ring_backend: str | None = None  # None: the backend registry decides (auto)
    aggregate: str = "per-map"  # "per-map": high-pass every map, sum; "mean-map": high-pass the averaged map
    border: str = "zero"  # FFT border of the high-pass: "zero" (padded) or "circular" (wraps)
    erf_from: str = "upper"  # kernel sizes from the bootstrap interval's upper end, or "point"

    def with_(self, **changes) -> "AnalysisConfig":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown analysis setting(s): {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    @property
    def points(self) -> list[tuple[float, float]]:
        pts = DEFAULT_PROBE_POINTS if self.probe_points is None else self.probe_points
        return [(float(y), float(x)) for y, x in pts]

    def validate(self) -> "AnalysisConfig":
        """Raise :class:`ConfigError` naming the first bad option; returns self."""
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        need(isinstance(self.steps, int) and self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        need(0 < self.threshold <= 1, f"--threshold must be in (0, 1], got {self.threshold}")
        need(0 < self.cutoff < 0.7072 and math.isfinite(self.cutoff),
             f"--cutoff must be in (0, √½ ≈ 0.707) cycles per token (the Nyquist radius), got {self.cutoff}")
        need(isinstance(self.order, int) and self.order >= 1, f"--order must be an integer >= 1, got {self.order}")
        need(self.highpass_mass in ("positive", "abs"), f"--highpass-mass must be 'positive' or 'abs', got {self.highpass_mass!r}")
        need(self.kernel_ratio > 0 and math.isfinite(self.kernel_ratio),
             f"--kernel-ratio must be a finite number > 0, got {self.kernel_ratio}")
        need(3 <= self.kmin <= self.kmax, f"--kmin/--kmax need 3 <= kmin <= kmax, got {self.kmin}, {self.kmax}")
        need(self.timestep_buckets >= 1, f"--timestep-buckets must be >= 1, got {self.timestep_buckets}")
        need(self.sink_factor > 1 and math.isfinite(self.sink_factor), f"--sink-factor must be > 1, got {self.sink_factor}")
        need(self.memory_budget_mb > 0, f"--memory-budget-mb must be > 0, got {self.memory_budget_mb}")
        need(self.ring_backend in (None, *backends.CHOICES),
             f"--ring-backend must be one of {', '.join(backends.CHOICES)}, got {self.ring_backend!r}")
        need(self.aggregate in AGGREGATES, f"--aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        need(self.border in BORDERS, f"--border must be one of {', '.join(BORDERS)}, got {self.border!r}")
        need(self.erf_from in ("upper", "point"), f"--erf-from must be 'upper' or 'point', got {self.erf_from!r}")
        for y, x in self.points:
            need(0 <= y <= 1 and 0 <= x <= 1, f"probe point ({y}, {x}) is outside [0, 1]")
        try:
            parse_queries(self.queries, (8, 8))
            if self.layers:
                for pat in self.layers.split(","):
                    re.compile(pat.strip())
        except re.error as exc:
            raise ConfigError(f"--layers {self.layers!r} is not a valid regular expression: {exc}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.resolution not in (None, "", 0):
            h, w = parse_resolution(self.resolution)
            need(0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE, f"--resolution {self.resolution}: each side must be in 1..{MAX_SIDE} px")
        return self

    def settings(self) -> dict:
        """The JSON-serialisable settings stored in a report."""
        d = asdict(self)
        d["probe_points"] = [list(p) for p in self.points]
        d.pop("resolution")
        d.pop("ring_backend")
        return d
