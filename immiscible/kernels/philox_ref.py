"""NumPy reference for the kernels' candidate noise: Philox4x32-10 and Box-Muller.

Element ``d = 4*m + r`` of candidate ``(sample, index)`` in ``stream`` is normal ``r`` of the Philox
block with key ``(seed lo, seed hi)`` and counter ``(m, index, sample, stream)``: uniforms
``u0..u3`` from the four words, then ``(u0, u1)`` and ``(u2, u3)`` through Box-Muller
(Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011). Philox, the uniforms and
the radius are Triton's; the angle's sine and cosine are polynomials (``sincos_2pi``), evaluated
in float32 in the kernels' order, so the interpreter matches this module bit for bit.
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


# sin and cos of (pi/2) f for |f| <= 1/2: Taylor coefficients (pi/2)**n / n! of the odd and even
# powers, truncated where the next term is below 3e-8 (float32's spacing near 1 is 6e-8).
SIN_COEFFS = (1.5707963267948966, -0.6459640975062462, 0.07969262624616703, -0.004681754135318687,
              1.6044118478735982e-4)
COS_COEFFS = (1.0, -1.2337005501361697, 0.25366950790104797, -0.020863480763352958, 9.192602748394263e-4)
ROUND = 12582912.0  # 1.5 * 2**23: adding it rounds a float in [0, 4] to an integer, kept in the low bits


def _horner(ff: np.ndarray, coeffs) -> np.ndarray:
    acc = np.float32(coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = np.float32(c) + ff * acc
    return acc


def sincos_2pi(u: np.ndarray):
    """``sin(2 pi u), cos(2 pi u)`` for u in [0, 1) in float32: exact quarter turns, then polynomials."""
    t = np.float32(4.0) * u
    tq = t + np.float32(ROUND)
    f = t - (tq - np.float32(ROUND))  # in [-1/2, 1/2], exact
    ff = f * f
    s, c = f * _horner(ff, SIN_COEFFS), _horner(ff, COS_COEFFS)
    q = np.asarray(tq, dtype=np.float32).view(np.int32)
    odd = (q & 1) != 0
    sin, cos = np.where(odd, c, s), np.where(odd, s, c)
    return np.where((q & 2) != 0, -sin, sin), np.where(((q + 1) & 2) != 0, -cos, cos)


def box_muller(u1: np.ndarray, u2: np.ndarray):
    """Two normals from two uniforms in float32: radius as Triton's (u1 clamped at 1e-7), angle by sincos_2pi."""
    r = np.sqrt(np.float32(-2.0) * np.log(np.maximum(np.float32(1.0e-7), u1)))
    sin, cos = sincos_2pi(u2)
    return r * cos, r * sin


def candidate(seed: int, sample: int, index: int, stream: int, numel: int) -> np.ndarray:
    """The kernels' candidate ``(sample, index)`` of ``stream`` as a float32 vector of ``numel``."""
    m = np.arange((numel + 3) // 4, dtype=np.uint32)
    w = philox4x32(seed, m, np.uint32(index), np.uint32(sample), np.uint32(stream))
    u = [uniform_from_uint32(v) for v in w]
    n0, n1 = box_muller(u[0], u[1])
    n2, n3 = box_muller(u[2], u[3])
    return np.stack([n0, n1, n2, n3], axis=1).reshape(-1)[:numel].astype(np.float32)
