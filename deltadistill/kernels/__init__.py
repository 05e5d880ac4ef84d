"""Triton kernels for the ΔConvBlock primitives.

Importing this package registers ``triton`` backends with :mod:`deltadistill.ops` (which imports
it lazily, only when Triton is usable). Without Triton installed the import is a no-op, so the
CPU reference path never depends on it.
"""
try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    TRITON_IMPORTED = False
else:
    TRITON_IMPORTED = True
    from deltadistill.kernels import dwconv, pool_upsample  # noqa: F401  (registers the kernels)
