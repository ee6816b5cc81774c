"""Chunked scoring of candidate noise: exact fp32 distances, memory flat in ``k``.

A *filler* writes fp32 candidates into a ``[C, D]`` buffer (``torch_rng.CandidateLayout.fill``);
these functions never hold more than one buffer of candidates (at least one group of them).

Distances are squared L2, ``|x - n|^2 = |x|^2 - 2 x.n + |n|^2``, accumulated in fp32 from fp32
inputs. Cosine scores are ``1 - x.n / (|x| |n|)``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

#: ``fill(buf, b0, b1, g0, g1)``: candidate groups ``[g0, g1)`` of samples ``b0..b1-1`` into ``buf``.
GroupFiller = Callable[[torch.Tensor, int, int, int, int], torch.Tensor]

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


class Scored(NamedTuple):
    """A selection and every candidate's scores (columns: a sample's ``k`` for knn, the pool for assign).

    ``dist``/``cos`` are full-resolution; ``coarse_dist``/``coarse_cos`` are in the pooled space
    candidates were ranked in (None without ``coarse``). ``cos`` is None when nobody asked for it.
    """

    noise: torch.Tensor                      # [B, D] the chosen noise (knn), or None before assignment
    index: torch.Tensor                      # [B] chosen column
    dist: torch.Tensor                       # [B, C] squared L2
    cos: torch.Tensor | None                 # [B, C] cosine
    coarse_dist: torch.Tensor | None = None  # [B, C] squared L2 after pooling
    coarse_cos: torch.Tensor | None = None   # [B, C] cosine after pooling

    def ranking(self, metric: str) -> torch.Tensor:
        """What the choice minimises: squared distance, or minus the cosine, in the ranking space."""
        dist, cos = (self.dist, self.cos) if self.coarse_dist is None else (self.coarse_dist, self.coarse_cos)
        return dist if metric == "l2" else cos.neg()


def distance_and_cosine(x_sq: torch.Tensor, n_sq: torch.Tensor, dots: torch.Tensor):
    """``|x - n|^2 = |x|^2 + |n|^2 - 2 x.n`` and ``cos = x.n / (|x| |n|)`` from broadcastable parts."""
    dist = (x_sq + n_sq - 2.0 * dots).clamp_min_(0.0)
    cos = dots / (x_sq.sqrt() * n_sq.sqrt()).clamp_min(1e-30)
    return dist, cos


def _plan(count: int, cap: int, group: int) -> tuple[int, int]:
    """``(samples per chunk, groups per chunk)``: whole samples when ``count`` fits ``cap``, else
    as many whole groups of one sample as fit (at least one)."""
    if count <= cap:
        return max(1, cap // count), -(-count // group)
    return 1, max(1, cap // group)


def knn_select(x: torch.Tensor, k: int, fill: GroupFiller, group: int, metric: str = "l2",
               chunk_bytes: int | None = None, with_cosines: bool = True, project=None) -> Scored:
    """Nearest of ``k`` candidates per latent, scored chunk by chunk and kept as it is found.

    ``x`` is fp32 ``[B, D]``; ``fill(buf, b0, b1, g0, g1)`` writes candidate groups ``[g0, g1)``
    (``group`` candidates each, the last may be shorter) of samples ``b0..b1-1`` into consecutive
    rows of ``buf``, sample-major. Each chunk's best candidate replaces a sample's noise only when
    it is strictly better, so ties go to the lowest index, as ``argmin`` does, and nothing is drawn
    twice. ``project`` (``coarse.pooling``) maps ``[n, D]`` to the space candidates are ranked in;
    the full-resolution scores are kept beside. Cosines are left out (None) when neither
    ``metric`` nor ``with_cosines`` asks for them.
    """
    batch, numel = x.shape
    samples, groups = _plan(k, rows_per_chunk(numel, chunk_bytes, k), group)
    with_cosines = with_cosines or (metric == "cosine" and project is None)
    per_sample = min(k, groups * group)
    buf = torch.empty(min(batch, samples) * per_sample, numel, dtype=torch.float32, device=x.device)
    rank = _Ranker(x, with_cosines, project)
    if samples >= batch and per_sample == k:  # one chunk holds every candidate: no running best
        block = fill(buf, 0, batch, 0, groups).view(batch, k, numel)
        scored = rank(block, 0, batch)
        index = torch.argmin(scored.ranking(metric), dim=1)
        return scored._replace(noise=block[torch.arange(batch, device=x.device), index], index=index)
    out = rank.outputs(k)
    noise = torch.empty_like(x)
    best = torch.full((batch,), float("inf"), device=x.device)
    index = torch.zeros(batch, dtype=torch.long, device=x.device)
    for b0 in range(0, batch, samples):
        b1 = min(batch, b0 + samples)
        for g0 in range(0, -(-k // group), groups):
            j0, j1 = g0 * group, min(k, (g0 + groups) * group)
            block = fill(buf[: (b1 - b0) * (j1 - j0)], b0, b1, g0, g0 + groups).view(b1 - b0, j1 - j0, numel)
            scored = rank(block, b0, b1)
            for name in ("dist", "cos", "coarse_dist", "coarse_cos"):
                if getattr(scored, name) is not None:
                    getattr(out, name)[b0:b1, j0:j1] = getattr(scored, name)
            score = scored.ranking(metric)
            arg = torch.argmin(score, dim=1)
            if j0 == 0 and j1 == k:  # the chunk holds these samples' every candidate: nothing to compare
                noise[b0:b1] = block[torch.arange(b1 - b0, device=x.device), arg]
                index[b0:b1] = arg
                continue
            low = score.gather(1, arg[:, None])[:, 0]
            better = low < best[b0:b1]
            rows = better.nonzero()[:, 0]
            if rows.numel():
                noise[b0 + rows] = block[rows, arg[rows]]
                best[b0 + rows] = low[rows]
                index[b0 + rows] = j0 + arg[rows]
    return out._replace(noise=noise, index=index)


class _Ranker:
    """Scores of candidate blocks against rows of ``x``: full resolution, and pooled with ``project``."""

    def __init__(self, x: torch.Tensor, with_cosines: bool, project=None):
        self.x, self.with_cosines, self.project = x, with_cosines, project
        self.x_sq = torch.linalg.vector_norm(x, dim=1).square()
        if project is not None:
            self.px = project(x)
            self.px_sq = torch.linalg.vector_norm(self.px, dim=1).square()

    def __call__(self, block: torch.Tensor, b0: int, b1: int) -> Scored:
        """Scores ``[nb, nj]`` of ``block [nb, nj, D]`` against samples ``b0..b1-1``."""
        dist, cos = _scores(self.x_sq[b0:b1], self.x[b0:b1], block, self.with_cosines)
        if self.project is None:
            return Scored(None, None, dist, cos)
        nb, nj, numel = block.shape
        pblock = self.project(block.reshape(nb * nj, numel)).view(nb, nj, -1)
        cdist, ccos = _scores(self.px_sq[b0:b1], self.px[b0:b1], pblock, True)
        return Scored(None, None, dist, cos, cdist, ccos)

    def outputs(self, columns: int) -> Scored:
        """Empty ``[B, columns]`` score tensors for what this ranker computes."""
        empty = lambda: torch.empty(self.x.shape[0], columns, dtype=torch.float32, device=self.x.device)  # noqa: E731
        pooled = self.project is not None
        return Scored(None, None, empty(), empty() if self.with_cosines else None,
                      empty() if pooled else None, empty() if pooled else None)


def _scores(x_sq: torch.Tensor, x: torch.Tensor, block: torch.Tensor, with_cosines: bool):
    """Squared distances (and cosines) ``[nb, nj]`` of ``block [nb, nj, D]`` to ``x [nb, D]``."""
    n_sq = torch.linalg.vector_norm(block, dim=2).square()                     # [nb, nj]
    dots = _dots(block, x)                                                     # [nb, nj]
    if with_cosines:
        return distance_and_cosine(x_sq[:, None], n_sq, dots)
    return (n_sq + x_sq[:, None]).sub_(dots, alpha=2.0).clamp_min_(0.0), None


#: From this many elements per sample, dot products go through BLAS one sample at a time.
MV_MIN_NUMEL = 4096


def _dots(block: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x[b] . block[b, j]`` as ``[nb, nj]``. The method depends on D alone, never on the chunking,
    so every chunking rounds each dot product the same way. (``bmm`` is 5x slower than either here.)"""
    if block.shape[2] >= MV_MIN_NUMEL:
        return torch.stack([torch.mv(block[i], x[i]) for i in range(block.shape[0])])
    return torch.linalg.vecdot(block, x[:, None, :])


def pool_distances(x: torch.Tensor, pool_size: int, fill: GroupFiller, group: int,
                   chunk_bytes: int | None = None, project=None) -> Scored:
    """Squared distances and cosines ``[B, pool_size]`` from every latent to every pool member
    (and in the pooled space with ``project``); ``noise`` and ``index`` are left None.

    The pool is one sample's ``pool_size`` candidates: ``fill(buf, 0, 1, g0, g1)``.
    """
    batch, numel = x.shape
    _, groups = _plan(pool_size, rows_per_chunk(numel, chunk_bytes, pool_size), group)
    buf = torch.empty(min(pool_size, groups * group), numel, dtype=torch.float32, device=x.device)
    rank = _Ranker(x, True, project)
    out = rank.outputs(pool_size)
    for g0 in range(0, -(-pool_size // group), groups):
        p0, p1 = g0 * group, min(pool_size, (g0 + groups) * group)
        block = fill(buf[: p1 - p0], 0, 1, g0, g0 + groups)
        out.dist[:, p0:p1], out.cos[:, p0:p1] = _pair_scores(rank.x_sq, x, block)
        if project is not None:
            out.coarse_dist[:, p0:p1], out.coarse_cos[:, p0:p1] = _pair_scores(rank.px_sq, rank.px, project(block))
    return out


def _pair_scores(x_sq: torch.Tensor, x: torch.Tensor, block: torch.Tensor):
    """Squared distances and cosines ``[B, C]`` of every row of ``x [B, D]`` to every row of ``block [C, D]``."""
    n_sq = torch.linalg.vector_norm(block, dim=1).square()
    return distance_and_cosine(x_sq[:, None], n_sq[None, :], x @ block.T)
