"""Argument validation shared by every entry point.

Bad user input raises ``ValueError``/``TypeError`` that names the argument and its
allowed range; ``assert`` is kept for internal invariants only.
"""
from __future__ import annotations

import numbers

import torch

MODES = ("knn", "assign")
METRICS = ("l2", "cosine")
BACKENDS = ("auto", "torch", "triton")

#: Largest accepted ``k``. Beyond this the selection costs minutes per step and the
#: effect has long saturated (the reduction grows like sqrt(2 log k)).
MAX_K = 65536
#: Largest accepted assignment cost matrix, ``B * (k * B)`` entries (1 GiB in float64).
MAX_ASSIGN_COST_ENTRIES = 2**27
#: Largest accepted elements per sample (the Philox counter holds it in 32 bits, 4 at a time).
MAX_ELEMENTS_PER_SAMPLE = 2**33


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer in [1, {MAX_K}], got {k!r} ({type(k).__name__})")
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in [1, {MAX_K}] (1 = plain Gaussian noise), got {k}")
    return k


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def check_latents(latents) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor of shape [B, ...], got {type(latents).__name__}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must have a floating dtype (float16/bfloat16/float32/float64), got {latents.dtype}")
    if latents.dim() < 2:
        raise ValueError(f"latents must have at least 2 dims [B, ...], got shape {tuple(latents.shape)}")
    if latents.shape[0] < 1:
        raise ValueError(f"latents must hold at least one sample (batch size >= 1), got shape {tuple(latents.shape)}")
    if latents[0].numel() < 1:
        raise ValueError(f"latents must have at least one element per sample, got shape {tuple(latents.shape)}")
    if latents[0].numel() > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"latents may have at most {MAX_ELEMENTS_PER_SAMPLE} elements per sample, "
                         f"got {latents[0].numel()}")
    # One fp64 reduction: NaN and Inf propagate, and no finite input overflows it.
    if not bool(torch.isfinite(latents.sum(dtype=torch.float64))):
        raise ValueError("latents contain NaN or Inf; immiscible selection needs finite latents")
    return latents


def check_assign_size(batch: int, k: int) -> None:
    entries = batch * batch * k
    if entries > MAX_ASSIGN_COST_ENTRIES:
        raise ValueError(
            f"mode='assign' with batch size {batch} and k={k} needs a {batch}x{batch * k} cost matrix; "
            f"batch**2 * k must be at most {MAX_ASSIGN_COST_ENTRIES} (use a smaller k or mode='knn')")
