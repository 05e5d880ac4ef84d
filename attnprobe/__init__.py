"""attnprobe: measure how local the self-attention of diffusion models is.

Public API::

    from attnprobe import analyze, capture, load_report
    report = analyze(pipe, ["a photo of a cat"], threshold=0.8)
    report.save("erf.json")

    with capture(pipe, queries="stride:2") as probe:   # lower level: raw accumulators
        pipe("a photo of a cat")
"""
from attnprobe._version import __version__
from attnprobe.analysis import analyze
from attnprobe.capture import capture
from attnprobe.report import Report, load_report, merge_reports

__all__ = ["analyze", "capture", "load_report", "merge_reports", "Report", "__version__"]
