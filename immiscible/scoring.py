"""Chunked scoring of candidate noise: exact fp32 distances, memory flat in ``k``.

A *filler* writes fp32 candidates into a ``[C, D]`` buffer (``torch_rng.fill_candidates`` or the
Triton materializing kernel); these functions never hold more than one buffer of candidates.

Distances are squared L2, ``|x - n|^2 = |x|^2 - 2 x.n + |n|^2``, accumulated in fp32 from fp32
inputs. Cosine scores are ``1 - x.n / (|x| |n|)``.
"""
from __future__ import annotations

from typing import Callable

import torch

Filler = Callable[[torch.Tensor, list], torch.Tensor]  # fill(buf, [(sample, first, count), ...])

#: Default size of one candidate buffer. Peak extra memory of the torch backend is one buffer,
#: at most this and at most an eighth of one sample's candidates (but 32 rows), plus the output
#: noise (B*D floats) and O(B*k) scores: it never grows with k.
DEFAULT_CHUNK_BYTES = 8 * 2**20
MIN_CHUNK_ROWS = 32
SMALL_CHUNK_BYTES = 2**20  # a buffer this small is never worth splitting further


def rows_per_chunk(numel: int, chunk_bytes: int | None, candidates_per_sample: int) -> int:
    """Candidates per buffer: within ``chunk_bytes`` and, by default, an eighth of one sample's."""
    if chunk_bytes is None:
        budget = DEFAULT_CHUNK_BYTES // (4 * numel)
        floor = max(MIN_CHUNK_ROWS, SMALL_CHUNK_BYTES // (4 * numel), -(-candidates_per_sample // 8))
        return max(1, min(budget, floor))
    if int(chunk_bytes) < 1:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes}")
    return max(1, int(chunk_bytes) // (4 * numel))


def distance_and_cosine(x_sq: torch.Tensor, n_sq: torch.Tensor, dots: torch.Tensor):
    """``|x - n|^2 = |x|^2 + |n|^2 - 2 x.n`` and ``cos = x.n / (|x| |n|)`` from broadcastable parts."""
    dist = (x_sq + n_sq - 2.0 * dots).clamp_min_(0.0)
    cos = dots / (x_sq.sqrt() * n_sq.sqrt()).clamp_min(1e-30)
    return dist, cos


def _outputs(x: torch.Tensor, columns: int):
    dist = torch.empty(x.shape[0], columns, dtype=torch.float32, device=x.device)
    return dist, torch.empty_like(dist), torch.linalg.vector_norm(x, dim=1).square()


def _aligned(rows: int, total: int, align: int) -> int:
    """``rows`` rounded down to a multiple of ``align`` (the filler's group) where that fits."""
    return rows if rows >= total or rows < align else rows // align * align


def knn_distances(x: torch.Tensor, k: int, fill: Filler, chunk_bytes: int | None = None, align: int = 1):
    """Squared distances and cosines ``[B, k]`` from each latent ``x[b]`` to its own candidates.

    ``x`` is fp32 ``[B, D]``; ``fill(buf, runs)`` writes the candidates of
    ``runs = [(sample, first, count), ...]`` into consecutive rows of ``buf``.
    A chunk holds either several whole samples' candidates (small ``k``) or a slice of one's,
    a multiple of ``align`` candidates where the budget allows.
    """
    batch, numel = x.shape
    cap = rows_per_chunk(numel, chunk_bytes, k)
    per_sample = _aligned(min(k, cap), k, align)
    samples = max(1, cap // k)
    buf = torch.empty(min(batch, samples) * per_sample, numel, dtype=torch.float32, device=x.device)
    dist, cos, x_sq = _outputs(x, k)
    for b0 in range(0, batch, samples):
        b1 = min(batch, b0 + samples)
        for j0 in range(0, k, per_sample):
            j1 = min(k, j0 + per_sample)
            runs = [(b, j0, j1 - j0) for b in range(b0, b1)]
            block = fill(buf[: (b1 - b0) * (j1 - j0)], runs).view(b1 - b0, j1 - j0, numel)
            n_sq = torch.linalg.vector_norm(block, dim=2).square()              # [nb, nj]
            dots = torch.bmm(block, x[b0:b1, :, None])[..., 0]                  # [nb, nj]
            dist[b0:b1, j0:j1], cos[b0:b1, j0:j1] = distance_and_cosine(x_sq[b0:b1, None], n_sq, dots)
    return dist, cos


def pool_distances(x: torch.Tensor, pool_size: int, fill: Filler, chunk_bytes: int | None = None,
                   align: int = 1):
    """Squared distances and cosines ``[B, pool_size]`` from every latent to every pool member."""
    batch, numel = x.shape
    cap = _aligned(min(pool_size, rows_per_chunk(numel, chunk_bytes, pool_size)), pool_size, align)
    buf = torch.empty(cap, numel, dtype=torch.float32, device=x.device)
    dist, cos, x_sq = _outputs(x, pool_size)
    for p0 in range(0, pool_size, cap):
        p1 = min(pool_size, p0 + cap)
        block = fill(buf[: p1 - p0], [(0, p0, p1 - p0)])
        n_sq = torch.linalg.vector_norm(block, dim=1).square()                  # [C]
        dist[:, p0:p1], cos[:, p0:p1] = distance_and_cosine(x_sq[:, None], n_sq[None, :], x @ block.T)
    return dist, cos
