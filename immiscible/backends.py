"""The two backends: where candidates come from and how they are scored.

Both give every candidate as a pure function of ``(seed, sample id, index, stream)``, so a
selection depends on a sample's id, never on its position in the batch. They draw different
(equally Gaussian) candidates: torch's generators here, Philox in the Triton kernels.
"""
from __future__ import annotations

import torch

from .scoring import (Scored, distance_and_cosine, knn_select, l2_ranking, large_rows, pool_distances,
                      pooled_pool_distances)
from .seeding import derive_seed
from .torch_rng import KNN_STREAM, POOL_STREAM, CandidateLayout


class _PoolScoring:
    """The assignment pool's scores, the same for both backends given their ``_pool_fill(numel,
    pool_size) -> (fill, group)`` (how a backend writes pool members into a chunk)."""

    def pool_scores(self, x, pool_size, chunk_bytes, project=None) -> Scored:
        fill, group = self._pool_fill(x.shape[1], pool_size)
        return pool_distances(x, pool_size, fill, group, chunk_bytes, project)

    def pooled_pool_scores(self, px, pool_size, numel, chunk_bytes, project):
        """``scoring.pooled_pool_distances`` of this backend's pool (latents held only pooled)."""
        fill, group = self._pool_fill(numel, pool_size)
        return pooled_pool_distances(px, pool_size, fill, group, numel, chunk_bytes, project)


class TorchBackend(_PoolScoring):
    """Candidates from torch's generators (any device), scored in chunks (``scoring.py``)."""

    name = "torch"

    def __init__(self, seed: int, sample_ids: list[int]):
        self.seed, self.ids = seed, sample_ids

    def _layout(self, numel, count, stream):
        return CandidateLayout(self.seed, numel, count, stream)

    def knn(self, x, k, metric, chunk_bytes, with_cosines=True, project=None) -> Scored:
        """Each sample's nearest of ``k`` (ranked after ``project`` when given), with every score."""
        layout = self._layout(x.shape[1], k, KNN_STREAM)
        fill = lambda buf, b0, b1, g0, g1: layout.fill(buf, self.ids[b0:b1], g0, g1)  # noqa: E731
        return knn_select(x, k, fill, layout.group, metric, chunk_bytes, with_cosines, project)

    def _pool_fill(self, numel, pool_size):
        layout = self._layout(numel, pool_size, POOL_STREAM)
        return (lambda buf, b0, b1, g0, g1: layout.fill(buf, [0], g0, g1)), layout.group

    def pool_members(self, out, pool_size, index):
        return self._layout(out.shape[1], pool_size, POOL_STREAM).fill_members(out, [0] * len(index), index)

    def all_candidates(self, batch, numel, count, mode, device):
        """Every candidate, ``[B * k, D]`` (knn) or ``[pool, D]`` (assign)."""
        if mode == "knn":
            layout, ids = self._layout(numel, count, KNN_STREAM), self.ids
        else:
            layout, ids = self._layout(numel, count, POOL_STREAM), [0]
        out = torch.empty(len(ids) * count, numel, device=device)
        return layout.fill(out, ids, 0, layout.groups)


class TritonBackend(_PoolScoring):
    """Candidates from the Philox kernels; knn is scored by the fused kernel without materializing."""

    name = "triton"

    def __init__(self, seed: int, sample_ids: list[int]):
        self.seed = derive_seed(seed)  # 63 bits: a signed 64-bit kernel argument
        self.ids = sample_ids

    def _write(self, out, sample, index, stream):
        from .kernels.philox_knn import write_candidates

        return write_candidates(out, self.seed, torch.as_tensor(sample, dtype=torch.int64),
                                torch.as_tensor(index, dtype=torch.int64), stream)

    def knn(self, x, k, metric, chunk_bytes, with_cosines=True, project=None) -> Scored:
        """The fused kernel: Philox candidates scored in registers, never written to memory.

        With ``project`` (coarse selection) the same Philox candidates are written a chunk at a
        time and ranked by the torch scorer instead: pooling needs each candidate's elements
        grouped by output cell, which the kernel's flat element-parallel reduction does not have.
        Memory stays flat in ``k`` (one chunk), the candidates and so the choice set are the
        kernel's own, and the backend reported is still ``"triton"``.
        """
        if project is not None:
            def fill(buf, b0, b1, g0, g1):  # groups of one candidate: group g is candidate g
                g1 = min(g1, k)
                ids = [i for i in self.ids[b0:b1] for _ in range(g1 - g0)]
                return self._write(buf[: len(ids)], ids, list(range(g0, g1)) * (b1 - b0), KNN_STREAM)

            return knn_select(x, k, fill, 1, metric, chunk_bytes, with_cosines, project)
        from .kernels.philox_knn import knn_partial_scores

        ids = torch.tensor(self.ids, dtype=torch.int64, device=x.device)
        nn, xn = knn_partial_scores(x, k, self.seed, ids)
        x_sq = torch.linalg.vector_norm(x, dim=1).square()
        dist, cos = distance_and_cosine(x_sq[:, None], nn, xn)
        scored = Scored(None, None, dist, cos, l2=l2_ranking(large_rows(x_sq), nn, xn, dist))
        index = torch.argmin(scored.ranking(metric), dim=1)
        noise = self._write(torch.empty_like(x), self.ids, index.tolist(), KNN_STREAM)
        return scored._replace(noise=noise, index=index)

    def _pool_fill(self, numel, pool_size):
        def fill(buf, b0, b1, g0, g1):  # groups of one candidate: group g is pool member g
            g1 = min(g1, pool_size)
            return self._write(buf[: g1 - g0], [0] * (g1 - g0), list(range(g0, g1)), POOL_STREAM)

        return fill, 1

    def pool_members(self, out, pool_size, index):
        return self._write(out, [0] * len(index), list(index), POOL_STREAM)

    def all_candidates(self, batch, numel, count, mode, device):
        if mode == "knn":
            sample = [i for i in self.ids for _ in range(count)]
            index = list(range(count)) * len(self.ids)
            stream = KNN_STREAM
        else:
            sample, index, stream = [0] * count, list(range(count)), POOL_STREAM
        return self._write(torch.empty(len(index), numel, device=device), sample, index, stream)


BACKENDS = {"torch": TorchBackend, "triton": TritonBackend}
