"""Triton kernels for the ΔConvBlock primitives, registered with :mod:`attnprobe.core.backends`.

:mod:`deltadistill.ops` declares this package as the GPU provider of its ops; the registry imports
it only when Triton is installed, so the CPU reference path never depends on it. One module per
op, each beside the PyTorch reference it is tested against: :mod:`.dwconv` (forward, dgrad,
wgrad), :mod:`.pool`, :mod:`.adaptive_pool`, :mod:`.gate`, :mod:`.upsample`, and :mod:`.stage`, the fused
[pool →] conv → gate pyramid stage.
"""
from deltadistill.kernels import adaptive_pool, dwconv, gate, pool, stage, upsample  # noqa: F401  (importing registers them)
