"""Candidate noise from torch's own generators: one counter-derived seed per group of candidates.

The ``count`` candidates of one sample (``k`` for knn, the pool for assign) come in groups of
``G = group_size(D, count)``, one generator call per group, so small latents do not pay a
generator seeding per candidate:

    candidate (sample id i, index j) = row j % G of randn(size_g, D), seeded by
                                       derive_seed(seed, i, j // G, stream)

where ``size_g`` is ``G`` except for a shorter last group. A candidate depends on the seed, the
sample's *id* (not its position in the batch), ``j``, ``D`` and ``count``, and on nothing else:
not on the batch size, the chunk size or the memory budget, so any chunking gives the same
selection. ``G`` never exceeds ``count``, so no candidate is drawn that is not scored.
"""
from __future__ import annotations

import numpy as np
import torch

from .seeding import derive_seed, derive_seeds

#: ``stream`` values: per-sample KNN candidates, and the shared pool of ``mode="assign"``.
KNN_STREAM = 0
POOL_STREAM = 1

#: Elements drawn by one generator call at most (256 KiB of fp32).
GROUP_ELEMENTS = 2**16

_generators: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    return gen


def group_size(numel: int, count: int) -> int:
    """Candidates per generator call: as many as fit ``GROUP_ELEMENTS``, at most ``count``, at least 1."""
    return max(1, min(count, GROUP_ELEMENTS // numel))


def group_seeds(seed: int, sample_ids, g0: int, g1: int, stream: int) -> list[int]:
    """Generator seeds ``derive_seed(seed, id, g, stream)`` for groups ``[g0, g1)`` of each id, id-major."""
    if len(sample_ids) * (g1 - g0) <= 8:  # NumPy's per-call cost exceeds a few scalar mixes
        return [derive_seed(seed, i, g, stream) for i in sample_ids for g in range(g0, g1)]
    ids = np.asarray(sample_ids, dtype=np.uint64)[:, None]
    return derive_seeds(seed, ids, np.arange(g0, g1, dtype=np.uint64)[None, :], stream).reshape(-1).tolist()


def draw_groups(out: torch.Tensor, seeds, sizes) -> torch.Tensor:
    """Fill consecutive rows of fp32 ``out`` (``[sum(sizes), D]``) with one group per seed."""
    gen = _generator(out.device)
    if len(seeds) == 1:
        out[: sizes[0]].normal_(generator=gen.manual_seed(seeds[0]))
        return out
    for s, rows in zip(seeds, out[: sum(sizes)].split_with_sizes(sizes)):  # views in one call: small D is loop-bound
        gen.manual_seed(s)
        rows.normal_(generator=gen)
    return out


class CandidateLayout:
    """Where each candidate of ``count`` per sample comes from, for samples of ``numel`` elements."""

    def __init__(self, seed: int, numel: int, count: int, stream: int):
        self.seed, self.numel, self.count, self.stream = seed, numel, count, stream
        self.group = group_size(numel, count)
        self.groups = -(-count // self.group)

    def size(self, g: int) -> int:
        return min(self.group, self.count - g * self.group)

    def fill(self, out: torch.Tensor, sample_ids, g0: int, g1: int) -> torch.Tensor:
        """Rows of ``out`` := groups ``[g0, g1)`` of each sample in ``sample_ids``, sample-major."""
        g1 = min(g1, self.groups)
        sizes = [self.size(g) for g in range(g0, g1)] * len(sample_ids)
        return draw_groups(out, group_seeds(self.seed, sample_ids, g0, g1, self.stream), sizes)

    def fill_members(self, out: torch.Tensor, sample_ids, index) -> torch.Tensor:
        """Row ``r`` of ``out`` := candidate ``index[r]`` of sample ``sample_ids[r]`` (regeneration)."""
        scratch = torch.empty(self.group, self.numel, dtype=out.dtype, device=out.device)
        for r, (sid, j) in enumerate(zip(sample_ids, index)):
            g = j // self.group
            draw_groups(scratch, group_seeds(self.seed, [sid], g, g + 1, self.stream), [self.size(g)])
            out[r] = scratch[j - g * self.group]
        return out
