"""Counter-based seed derivation: every candidate is a pure function of (seed, sample, candidate)."""
from __future__ import annotations

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele et al., 2014): a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *streams: int) -> int:
    """Mix ``streams`` (sample index, candidate index, process rank, ...) into ``seed``.

    The result is a 63-bit non-negative int, usable with ``torch.Generator.manual_seed``.
    """
    x = splitmix64(seed & _MASK64)
    for s in streams:
        x = splitmix64(x ^ (int(s) & _MASK64))
    return x >> 1


def draw_seed(generator: torch.Generator | None = None) -> int:
    """Draw a 63-bit seed from ``generator`` (torch's default CPU generator when None).

    This is what ``seed=None`` does, so a training script's ``--seed`` governs selection.
    """
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64).item())


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_seeds(seed: int, *streams) -> np.ndarray:
    """:func:`derive_seed` over broadcast arrays of stream values, as a uint64 array.

    ``derive_seeds(s, a, b)[i, j] == derive_seed(s, a[i, j], b[i, j])`` for broadcastable ``a, b``.
    """
    with np.errstate(over="ignore"):
        x = _splitmix64_array(np.asarray(seed & _MASK64, dtype=np.uint64))
        for s in streams:
            x = _splitmix64_array(x ^ np.asarray(s, dtype=np.uint64))
    return x >> np.uint64(1)
