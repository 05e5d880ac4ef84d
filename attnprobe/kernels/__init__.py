"""GPU kernels of the analyser.

:mod:`attnprobe.kernels.ringmass` fuses softmax attention with the ℓ∞ ring-mass reduction, so the
N×N attention map is never written to memory. It imports without Triton (the plain PyTorch
reference is always available); the Triton path needs Triton and a CUDA device.
"""
from attnprobe.kernels.ringmass import ring_mass_attention, ring_mass_attention_reference, triton_usable

__all__ = ["ring_mass_attention", "ring_mass_attention_reference", "triton_usable"]
