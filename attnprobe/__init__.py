"""attnprobe: measure how local the self-attention of diffusion models is.

Public API (imported lazily, so ``import attnprobe.core`` stays light)::

    from attnprobe import analyze, capture, load_report
    report = analyze(pipe, ["a photo of a cat"], threshold=0.8)
    report.save("erf.json")

    with capture(pipe, queries="stride:2") as probe:   # lower level: raw accumulators
        pipe("a photo of a cat")

Layers: :mod:`attnprobe.core` (model families, registry, running pipelines, outputs, backends)
is shared with deltadistill; the analysis (capture, stats, report, plots, html) builds on it.
"""
from attnprobe._version import __version__

__all__ = ["analyze", "capture", "load_report", "merge_reports", "Report", "AnalysisConfig", "__version__"]

_LAZY = {
    "analyze": ("attnprobe.analysis", "analyze"),
    "capture": ("attnprobe.capture", "capture"),
    "load_report": ("attnprobe.report", "load_report"),
    "merge_reports": ("attnprobe.merge", "merge_reports"),
    "Report": ("attnprobe.report", "Report"),
    "AnalysisConfig": ("attnprobe.config", "AnalysisConfig"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'attnprobe' has no attribute {name!r}")
