"""Merging reports of the same model and settings: their accumulated sums add exactly.

Shards of one analysis (other prompts or seeds, other machines) combine into the report a single
run over all of them would have written. A run counted twice would double its attention, so every
report carries a ``run_id`` and merging refuses a run id seen twice, or a (prompt, seed) pair that
two inputs share (overlapping shards).
"""
from __future__ import annotations

import numpy as np

from attnprobe.report import ACCUMULATORS, LayerResult, Report, ReportError, prompts_hash

__all__ = ["merge_reports", "MERGE_KEYS"]

# settings that must agree for two reports to merge
MERGE_KEYS = (
    "resolution",
    "steps",
    "guidance_scale",
    "cutoff",
    "order",
    "highpass_mass",
    "queries",
    "timestep_buckets",
    "probe_points",
    "dtype",
    "border",
    "aggregate",
)

def _leaf_runs(report: "Report") -> list[str]:
    """Run ids a report was made of (merged reports keep their parts')."""
    run = report.run or {}
    if "merged" in run:
        return [rid for part in run["merged"] for rid in ([part.get("run_id")] if "merged" not in part else
                                                           [p.get("run_id") for p in part["merged"]]) if rid]
    return [run["run_id"]] if run.get("run_id") else []


def merge_reports(reports: list[Report]) -> Report:
    """Add the accumulators of reports of the same model, settings and layers."""
    if len(reports) < 2:
        raise ReportError("merge needs at least two reports")
    base = reports[0]
    if any(l.mean_map is not None for r in reports for l in r.layers):
        raise ReportError("reports analysed with --aggregate mean-map cannot be merged: the high-pass of an averaged map "
                          "is not a sum of the parts' statistics; merge per-map reports or analyse in one run")
    for i, other in enumerate(reports[1:], start=2):
        if other.model.get("config_hash") != base.model.get("config_hash"):
            raise ReportError(
                f"report {i} is of a different model ({other.model.get('alias')}, config {other.model.get('config_hash')}) "
                f"than report 1 ({base.model.get('alias')}, config {base.model.get('config_hash')})"
            )
        for key in MERGE_KEYS:
            if other.settings.get(key) != base.settings.get(key):
                raise ReportError(
                    f"report {i} differs in setting {key!r}: {other.settings.get(key)!r} vs {base.settings.get(key)!r}"
                )
        names = [(l.name, tuple(l.grid), l.heads) for l in other.layers]
        if names != [(l.name, tuple(l.grid), l.heads) for l in base.layers]:
            raise ReportError(f"report {i} covers different layers or grids than report 1")
    seen_runs: dict[str, int] = {}
    seen_pairs: dict[tuple, int] = {}
    for i, r in enumerate(reports, start=1):
        for rid in _leaf_runs(r):
            if rid in seen_runs:
                raise ReportError(f"report {i} contains run {rid} again (already in report {seen_runs[rid]}); merging a run "
                                  "with itself would count its attention twice")
            seen_runs[rid] = i
        seeds = r.settings.get("seeds") or [r.settings.get("seed")] * len(r.settings.get("prompts", []))
        for pair in zip(r.settings.get("prompts", []), seeds):
            if pair in seen_pairs:
                raise ReportError(f"report {i} repeats prompt {pair[0]!r} with seed {pair[1]} of report {seen_pairs[pair]} "
                                  "(overlapping shards); give each shard different prompts or seeds")
            seen_pairs[pair] = i
    settings = dict(base.settings)
    settings["prompts"] = [p for r in reports for p in r.settings.get("prompts", [])]
    settings["prompts_hash"] = prompts_hash(settings["prompts"])
    settings["n_prompts"] = len(settings["prompts"])
    settings["seeds"] = [s for r in reports for s in r.settings.get("seeds", [r.settings.get("seed")])]
    settings["merged_from"] = sum(int(r.settings.get("merged_from", 1)) for r in reports)
    layers = []
    for group in zip(*(r.layers for r in reports)):
        first = group[0]
        acc = {key: sum(getattr(l, key) for l in group) for key in ACCUMULATORS}
        if all(l.far_key_mass is not None for l in group):
            acc["far_key_mass"] = sum(l.far_key_mass for l in group)
            acc["far_rows"] = sum(l.far_rows for l in group)
        if all(l.prompt_hp_ring is not None for l in group):
            acc["prompt_hp_ring"] = np.concatenate([l.prompt_hp_ring for l in group])
        layers.append(
            LayerResult(
                name=first.name, label=first.label, grid=first.grid, heads=first.heads, level=first.level,
                joint=first.joint, settings=settings, **acc,
            )
        )
    run = {"merged": [r.run for r in reports]}
    images = [img for r in reports for img in r.images]
    return Report(model=base.model, settings=settings, run=run, layers=layers, images=images)
