"""attnprobe: measure how local the self-attention of diffusion models is.

Public API (imported lazily so that ``import attnprobe`` stays cheap)::

    from attnprobe import analyze, load_report, capture
    report = analyze(pipe, ["a photo of a cat"], threshold=0.8)
    report.save("erf.json")
"""
__version__ = "0.1.0"

__all__ = ["analyze", "load_report", "capture", "Report", "__version__"]


def __getattr__(name):
    if name in ("analyze",):
        from attnprobe.analyze import analyze

        return analyze
    if name in ("load_report", "Report"):
        from attnprobe import report

        return getattr(report, name)
    if name == "capture":
        from attnprobe.capture import capture

        return capture
    raise AttributeError(f"module 'attnprobe' has no attribute {name!r}")
