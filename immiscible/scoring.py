"""Chunked scoring of candidate noise: exact fp32 distances, memory flat in ``k``.

A *filler* writes fp32 candidates into a ``[C, D]`` buffer (``torch_rng.fill_candidates`` or the
Triton materializing kernel); these functions never hold more than one buffer of candidates.

Distances are squared L2, ``|x - n|^2 = |x|^2 - 2 x.n + |n|^2``, accumulated in fp32 from fp32
inputs. Cosine scores are ``1 - x.n / (|x| |n|)``.
"""
from __future__ import annotations

from typing import Callable

import torch

Filler = Callable[[torch.Tensor, list], torch.Tensor]

#: Default size of one candidate buffer. Peak extra memory of the torch backend is about
#: this buffer plus the output noise (B*D floats) and O(B*k) scores.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def rows_per_chunk(numel: int, chunk_bytes: int | None) -> int:
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    if budget < 1:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")
    return max(1, budget // (4 * numel))


def _score_block(buf: torch.Tensor, x: torch.Tensor, x_sq: torch.Tensor, x_norm: torch.Tensor):
    """Squared distances and cosines between rows of ``buf`` [C, D] and latents ``x`` [R, D] -> [R, C]."""
    n_sq = torch.linalg.vector_norm(buf, dim=1).square()        # [C]
    dots = x @ buf.T                                            # [R, C]
    dist = (x_sq[:, None] + n_sq[None, :] - 2.0 * dots).clamp_min_(0.0)
    cos = dots / (x_norm[:, None] * n_sq.sqrt()[None, :]).clamp_min(1e-30)
    return dist, cos


def knn_distances(x: torch.Tensor, k: int, fill: Filler, chunk_bytes: int | None = None):
    """Squared distances and cosines ``[B, k]`` from each latent ``x[b]`` to its own candidates.

    ``x`` is fp32 ``[B, D]``; ``fill(buf, rows)`` writes candidates ``rows = [(b, j), ...]``.
    """
    batch, numel = x.shape
    cap = min(k, rows_per_chunk(numel, chunk_bytes))
    buf = torch.empty(cap, numel, dtype=torch.float32, device=x.device)
    dist = torch.empty(batch, k, dtype=torch.float32, device=x.device)
    cos = torch.empty_like(dist)
    x_sq = torch.linalg.vector_norm(x, dim=1).square()
    x_norm = x_sq.sqrt()
    for b in range(batch):
        for j0 in range(0, k, cap):
            j1 = min(k, j0 + cap)
            block = fill(buf[: j1 - j0], [(b, j) for j in range(j0, j1)])
            d, c = _score_block(block, x[b : b + 1], x_sq[b : b + 1], x_norm[b : b + 1])
            dist[b, j0:j1], cos[b, j0:j1] = d[0], c[0]
    return dist, cos


def pool_distances(x: torch.Tensor, pool_size: int, fill: Filler, chunk_bytes: int | None = None):
    """Squared distances and cosines ``[B, pool_size]`` from every latent to every pool member."""
    batch, numel = x.shape
    cap = min(pool_size, rows_per_chunk(numel, chunk_bytes))
    buf = torch.empty(cap, numel, dtype=torch.float32, device=x.device)
    dist = torch.empty(batch, pool_size, dtype=torch.float32, device=x.device)
    cos = torch.empty_like(dist)
    x_sq = torch.linalg.vector_norm(x, dim=1).square()
    x_norm = x_sq.sqrt()
    for p0 in range(0, pool_size, cap):
        p1 = min(pool_size, p0 + cap)
        block = fill(buf[: p1 - p0], [(p, 0) for p in range(p0, p1)])
        dist[:, p0:p1], cos[:, p0:p1] = _score_block(block, x, x_sq, x_norm)
    return dist, cos
