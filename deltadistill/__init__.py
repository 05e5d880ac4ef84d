"""deltadistill: replace diffusion self-attention with ΔConvBlocks and distil them."""
__version__ = "0.1.0"
