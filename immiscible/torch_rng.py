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

from .seeding import derive_seeds

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


def group_seeds(seed: int, sample_ids, groups: int, stream: int) -> np.ndarray:
    """``[len(sample_ids), groups]`` uint64 generator seeds, ``derive_seed(seed, id, g, stream)``."""
    ids = np.asarray(sample_ids, dtype=np.uint64)[:, None]
    return derive_seeds(seed, ids, np.arange(groups, dtype=np.uint64)[None, :], stream)


def draw_groups(out: torch.Tensor, seeds, sizes) -> torch.Tensor:
    """Fill consecutive rows of fp32 ``out`` (``[sum(sizes), D]``) with one group per seed."""
    gen = _generator(out.device)
    for s, rows in zip(seeds, out[: sum(sizes)].split(sizes)):  # views made in one call: small D is loop-bound
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
        seeds = group_seeds(self.seed, sample_ids, self.groups, self.stream)[:, g0:g1]
        sizes = [self.size(g) for g in range(g0, g1)] * len(sample_ids)
        return draw_groups(out, seeds.reshape(-1).tolist(), sizes)

    def fill_members(self, out: torch.Tensor, sample_ids, index) -> torch.Tensor:
        """Row ``r`` of ``out`` := candidate ``index[r]`` of sample ``sample_ids[r]`` (regeneration)."""
        scratch = torch.empty(self.group, self.numel, dtype=out.dtype, device=out.device)
        for r, (sid, j) in enumerate(zip(sample_ids, index)):
            g = j // self.group
            seed = group_seeds(self.seed, [sid], g + 1, self.stream)[0, g]
            draw_groups(scratch, [int(seed)], [self.size(g)])
            out[r] = scratch[j - g * self.group]
        return out
