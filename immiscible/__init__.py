"""Immiscible diffusion noise assignment: pair each latent with noise that lies near it.

>>> import torch, immiscible
>>> latents = torch.randn(2, 4, 8, 8)
>>> noise = immiscible.select_noise(latents, 8, seed=0)
>>> noise.shape
torch.Size([2, 4, 8, 8])
"""
from .seeding import derive_seed, draw_seed
from .select import SelectionInfo, candidates, resolve_backend, select_noise

__version__ = "0.1.0"
__all__ = ["select_noise", "candidates", "SelectionInfo", "resolve_backend", "derive_seed", "draw_seed",
           "__version__"]
