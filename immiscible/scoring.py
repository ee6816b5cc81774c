"""Chunked scoring of candidate noise: exact fp32 distances, memory flat in ``k``.

A *filler* writes fp32 candidates into a ``[C, D]`` buffer (``torch_rng.CandidateLayout.fill``);
these functions never hold more than one buffer of candidates (at least one group of them).

Distances are squared L2, ``|x - n|^2 = |x|^2 - 2 x.n + |n|^2``, accumulated in fp32 from fp32
inputs. Cosine scores are ``1 - x.n / (|x| |n|)``.

A large latent (``|x|^2 >= LARGE_NORM_SQ``) is ranked by ``|n|^2 - 2 x.n`` instead of its distance:
the same order (``|x|^2`` is common to all of its candidates), without rounding ``|x|^2 + |n|^2`` to
a multiple of ulp(``|x|^2``), which loses the candidates' differences as ``|x|`` grows. The reported
distances are computed as before.
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

#: From this ``|x|^2`` on (``|x| >= 8192``) a latent's l2 ranking leaves ``|x|^2`` out (see the module
#: docstring). Measured with the distance itself, the fp32 choice differs from the float64 nearest
#: for 1e-5 of samples at ``|x| = 512`` (a Flux latent at unit scale), 1.5e-4 around ``|x| = 8192``,
#: 2e-3 at 65536, 16% at 8e6 and for every sample from about 1e15 on (all distances round alike:
#: candidate 0 everywhere); ranked without ``|x|^2`` it matched in every trial up to
#: ``checks.LATENT_ABS_MAX``. Latents below keep the distance ranking, bit for bit as before.
LARGE_NORM_SQ = 2.0**26


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
    l2: torch.Tensor | None = None           # [B, C] l2 ranking where it is not ``dist`` (large latents)
    coarse_l2: torch.Tensor | None = None    # [B, C] the same after pooling

    def ranking(self, metric: str) -> torch.Tensor:
        """What the choice minimises: squared distance (``l2_ranking``), or minus the cosine, in the ranking space."""
        if self.coarse_dist is None:
            dist, cos, l2 = self.dist, self.cos, self.l2
        else:
            dist, cos, l2 = self.coarse_dist, self.coarse_cos, self.coarse_l2
        if metric == "l2":
            return dist if l2 is None else l2
        return cos.neg()


def large_rows(x_sq: torch.Tensor) -> torch.Tensor | None:
    """Bool ``[B]``: the latents ranked without ``|x|^2`` (``|x|^2 >= LARGE_NORM_SQ``); None when there
    is none, the usual case, in which everything runs as it did before large latents were handled."""
    large = x_sq >= LARGE_NORM_SQ
    return large if bool(large.any()) else None


def l2_ranking(large: torch.Tensor | None, n_sq: torch.Tensor, dots: torch.Tensor,
               dist: torch.Tensor) -> torch.Tensor | None:
    """What l2 ranks by where it is not ``dist``: ``|n|^2 - 2 x.n`` in the rows ``large`` marks and
    ``dist`` elsewhere (``[B, C]``, from broadcastable parts); None when ``large`` is None."""
    if large is None:
        return None
    return torch.where(large[:, None], n_sq - 2.0 * dots, dist)


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
            for name in ("dist", "cos", "coarse_dist", "coarse_cos", "l2", "coarse_l2"):
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
        self.large = large_rows(self.x_sq)
        self.plarge = None
        if project is not None:
            self.px = project(x)
            self.px_sq = torch.linalg.vector_norm(self.px, dim=1).square()
            self.plarge = large_rows(self.px_sq)

    def __call__(self, block: torch.Tensor, b0: int, b1: int) -> Scored:
        """Scores ``[nb, nj]`` of ``block [nb, nj, D]`` against samples ``b0..b1-1``."""
        dist, cos, l2 = _scores(self.x_sq[b0:b1], self.x[b0:b1], block, self.with_cosines, _rows(self.large, b0, b1))
        if self.project is None:
            return Scored(None, None, dist, cos, l2=l2)
        nb, nj, numel = block.shape
        pblock = self.project(block.reshape(nb * nj, numel)).view(nb, nj, -1)
        cdist, ccos, cl2 = _scores(self.px_sq[b0:b1], self.px[b0:b1], pblock, True, _rows(self.plarge, b0, b1))
        return Scored(None, None, dist, cos, cdist, ccos, l2, cl2)

    def outputs(self, columns: int) -> Scored:
        """Empty ``[B, columns]`` score tensors for what this ranker computes."""
        empty = lambda: torch.empty(self.x.shape[0], columns, dtype=torch.float32, device=self.x.device)  # noqa: E731
        pooled = self.project is not None
        return Scored(None, None, empty(), empty() if self.with_cosines else None,
                      empty() if pooled else None, empty() if pooled else None,
                      empty() if self.large is not None else None, empty() if self.plarge is not None else None)


def _rows(large: torch.Tensor | None, b0: int, b1: int) -> torch.Tensor | None:
    return None if large is None else large[b0:b1]


def _scores(x_sq: torch.Tensor, x: torch.Tensor, block: torch.Tensor, with_cosines: bool, large=None):
    """Squared distances, cosines (or None) and the l2 ranking where it is not the distance (or None),
    each ``[nb, nj]``, of ``block [nb, nj, D]`` to ``x [nb, D]``."""
    n_sq = torch.linalg.vector_norm(block, dim=2).square()                     # [nb, nj]
    dots = _dots(block, x)                                                     # [nb, nj]
    if with_cosines:
        dist, cos = distance_and_cosine(x_sq[:, None], n_sq, dots)
    else:
        dist, cos = (n_sq + x_sq[:, None]).sub_(dots, alpha=2.0).clamp_min_(0.0), None
    return dist, cos, l2_ranking(large, n_sq, dots, dist)


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
        _pair_scores(rank.x_sq, x, block, rank.large, out.dist, out.cos, out.l2, p0, p1)
        if project is not None:
            _pair_scores(rank.px_sq, rank.px, project(block), rank.plarge, out.coarse_dist, out.coarse_cos,
                         out.coarse_l2, p0, p1)
    return out


def _pair_scores(x_sq: torch.Tensor, x: torch.Tensor, block: torch.Tensor, large, dist, cos, l2, p0: int, p1: int):
    """Squared distances, cosines and the l2 ranking (``l2_ranking``, when ``large`` marks a row) of
    every row of ``x [B, D]`` to every row of ``block [C, D]``, into columns ``p0:p1`` of ``dist``, ``cos``, ``l2``."""
    n_sq = torch.linalg.vector_norm(block, dim=1).square()[None, :]
    dots = x @ block.T
    dist[:, p0:p1], cos[:, p0:p1] = distance_and_cosine(x_sq[:, None], n_sq, dots)
    if large is not None:
        l2[:, p0:p1] = l2_ranking(large, n_sq, dots, dist[:, p0:p1])


def pooled_pool_distances(px: torch.Tensor, pool_size: int, fill: GroupFiller, group: int, numel: int,
                          chunk_bytes: int | None, project) -> tuple[Scored, torch.Tensor, torch.Tensor]:
    """:func:`pool_distances`' pooled half for latents held only pooled (``px = project(x)``, ``[B, P]``):
    the same chunks, so the same ``coarse_*`` scores bit for bit; ``dist``/``cos`` are None.

    Also returns the pool's moments, the sum of its members (``[numel]``) and the sum of their
    squared norms (a scalar), from which a process holding ``x`` gets its full-resolution mean
    distance ``|x|^2 + sum_sq / pool - 2 x . sum / pool`` without the pool.
    """
    _, groups = _plan(pool_size, rows_per_chunk(numel, chunk_bytes, pool_size), group)
    buf = torch.empty(min(pool_size, groups * group), numel, dtype=torch.float32, device=px.device)
    px_sq = torch.linalg.vector_norm(px, dim=1).square()
    plarge = large_rows(px_sq)
    empty = lambda: torch.empty(px.shape[0], pool_size, dtype=torch.float32, device=px.device)  # noqa: E731
    out = Scored(None, None, None, None, empty(), empty(), None, empty() if plarge is not None else None)
    total = torch.zeros(numel, dtype=torch.float64, device=px.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=px.device)
    for g0 in range(0, -(-pool_size // group), groups):
        p0, p1 = g0 * group, min(pool_size, (g0 + groups) * group)
        block = fill(buf[: p1 - p0], 0, 1, g0, g0 + groups)
        total += block.sum(0, dtype=torch.float64)
        total_sq += block.square().sum(dtype=torch.float64)
        _pair_scores(px_sq, px, project(block), plarge, out.coarse_dist, out.coarse_cos, out.coarse_l2, p0, p1)
    return out, total, total_sq
