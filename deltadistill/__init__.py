"""deltadistill: replace diffusion self-attention with ΔConvBlocks and distil them.

Public API (imported lazily so that ``import deltadistill`` stays cheap)::

    from deltadistill import convert, save, load, DeltaConvBlock
    convert(pipe, "erf.json")            # or an odd int K, or {module name: K}
    save(pipe, "out/", base_model="pixart")
    load(fresh_pipe, "out/")
"""
from deltadistill._version import __version__

__all__ = ["convert", "load", "save", "DeltaConvBlock", "__version__"]


def __getattr__(name):
    if name == "convert":
        from deltadistill.conversion import convert

        return convert
    if name in ("save", "load"):
        from deltadistill import io

        return getattr(io, name)
    if name == "DeltaConvBlock":
        from deltadistill.block import DeltaConvBlock

        return DeltaConvBlock
    raise AttributeError(f"module 'deltadistill' has no attribute {name!r}")
