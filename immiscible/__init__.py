"""Immiscible diffusion noise assignment: pair each latent with noise that lies near it.

>>> import torch, immiscible
>>> latents = torch.randn(2, 4, 8, 8)
>>> noise = immiscible.select_noise(latents, 8, seed=0)
>>> noise.shape
torch.Size([2, 4, 8, 8])
"""
from .checks import (BACKENDS, COARSE_MAX, K_MAX, K_MIN, LATENT_ABS_MAX, LATENT_ABS_MIN, LATENT_DTYPES, METRICS, MODES,
                     SAMPLE_ID_MAX, SCOPES, check_backend, check_choice, check_coarse, check_flag, check_int, check_k,
                     check_latents, check_metric, check_mode, check_scope, check_seed)
from .collective import CollectiveError, PeerSelectionError, abstain
from .coarse import coarse_pool
from .seeding import derive_seed, draw_seed
from .select import SelectionInfo, candidates, disabled_backends, reset_fallback, resolve_backend, select_noise

__version__ = "0.2.0"
__all__ = [
    # selection
    "select_noise", "candidates", "SelectionInfo", "resolve_backend", "disabled_backends", "reset_fallback",
    "derive_seed", "draw_seed", "coarse_pool",
    # selection over a process group (select_noise(..., group=...))
    "CollectiveError", "PeerSelectionError", "abstain",
    # vocabulary: the choices and ranges every adapter offers, and their checks
    "MODES", "METRICS", "BACKENDS", "SCOPES", "K_MIN", "K_MAX", "SAMPLE_ID_MAX", "COARSE_MAX", "LATENT_DTYPES", "LATENT_ABS_MAX",
    "LATENT_ABS_MIN",
    "check_k", "check_mode", "check_metric", "check_backend", "check_scope", "check_choice", "check_int", "check_flag", "check_seed",
    "check_coarse", "check_latents",
    "__version__",
]
