"""NumPy reference for the kernels' candidate noise: Philox4x32-10 and Box-Muller, as Triton does them.

Element ``d = 4*m + r`` of candidate ``(sample, index)`` in ``stream`` is normal ``r`` of the Philox
block with key ``(seed lo, seed hi)`` and counter ``(m, index, sample, stream)``: uniforms
``u0..u3`` from the four words, then ``(u0, u1)`` and ``(u2, u3)`` through Box-Muller
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011).
"""
from __future__ import annotations

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)


def _mulhilo(a: np.uint64, b: np.ndarray):
    prod = a * b.astype(np.uint64)
    return (prod >> np.uint64(32)).astype(np.uint32), (prod & _M32).astype(np.uint32)


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32-``rounds`` of counters ``(c0, c1, c2, c3)`` (uint32 arrays) under a 64-bit key."""
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint32) for c in np.broadcast_arrays(c0, c1, c2, c3))
    with np.errstate(over="ignore"):
        for _ in range(rounds):
            hi_b, lo_b = _mulhilo(_ROUND_B, c2)
            hi_a, lo_a = _mulhilo(_ROUND_A, c0)
            c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
            k0, k1 = k0 + _KEY_A, k1 + _KEY_B
    return c0, c1, c2, c3


def uniform_from_uint32(x: np.ndarray) -> np.ndarray:
    """Triton's ``uint_to_uniform_float``: 31 random bits scaled into [0, 1)."""
    x = x.view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def box_muller(u1: np.ndarray, u2: np.ndarray):
    """Triton's ``pair_uniform_to_normal`` in float32 (u1 clamped at 1e-7)."""
    u1 = np.maximum(np.float32(1.0e-7), u1)
    th = np.float32(6.283185307179586) * u2
    r = np.sqrt(np.float32(-2.0) * np.log(u1))
    return r * np.cos(th), r * np.sin(th)


def candidate(seed: int, sample: int, index: int, stream: int, numel: int) -> np.ndarray:
    """The kernels' candidate ``(sample, index)`` of ``stream`` as a float32 vector of ``numel``."""
    m = np.arange((numel + 3) // 4, dtype=np.uint32)
    w = philox4x32(seed, m, np.uint32(index), np.uint32(sample), np.uint32(stream))
    u = [uniform_from_uint32(v) for v in w]
    n0, n1 = box_muller(u[0], u[1])
    n2, n3 = box_muller(u[2], u[3])
    return np.stack([n0, n1, n2, n3], axis=1).reshape(-1)[:numel].astype(np.float32)
