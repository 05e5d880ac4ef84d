"""GPU kernels of the analyser, registered with :mod:`attnprobe.core.backends`.

:mod:`attnprobe.kernels.ringmass` fuses softmax attention with the ℓ∞ ring-mass reduction, so the
N×N attention map is never written to memory (op ``"ring_mass_attention"``). It imports without
Triton (the plain PyTorch reference is always registered); the Triton path needs Triton and a CUDA
device (or ``TRITON_INTERPRET=1``).
"""
from attnprobe.kernels.ringmass import ring_mass_attention, ring_mass_attention_reference, triton_usable

__all__ = ["ring_mass_attention", "ring_mass_attention_reference", "triton_usable"]
