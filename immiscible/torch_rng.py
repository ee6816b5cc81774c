"""Candidate noise from torch's own generators, one counter-derived seed per candidate.

Candidates of one sample come in groups of ``G = group_size(D)`` (one generator call per group,
so small latents do not pay a generator seeding per candidate): candidate ``(sample, index)`` is
row ``index % G`` of ``torch.randn(G, D)`` from a generator seeded with
``derive_seed(seed, sample, index // G, stream)``. ``G`` depends on ``D`` alone, so a candidate
depends on nothing else: not on ``k``, the batch size, the chunk size or the memory budget. The
candidates for ``k=4`` are the first four of those for ``k=64``, and any chunking gives the same
selection. The assignment pool is sample 0 of ``POOL_STREAM``.
"""
from __future__ import annotations

import torch

from .seeding import derive_seed

#: ``stream`` values: per-sample KNN candidates, and the shared pool of ``mode="assign"``.
KNN_STREAM = 0
POOL_STREAM = 1

_generators: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    return gen


#: Elements drawn by one generator call at most (and 64 candidates at most).
GROUP_ELEMENTS = 2**16


def group_size(numel: int) -> int:
    """Candidates per generator call for samples of ``numel`` elements (1 from 65536 elements up)."""
    return max(1, min(64, GROUP_ELEMENTS // numel))


Run = tuple[int, int, int]  # (sample, first index, count): candidates laid out one after another


def fill_candidates(out: torch.Tensor, seed: int, runs: list[Run], stream: int) -> torch.Tensor:
    """Write the candidates of ``runs`` into consecutive rows of ``out`` (fp32, ``[rows, D]``)."""
    gen = _generator(out.device)
    numel = out.shape[1]
    group = group_size(numel)
    scratch = None
    row = 0
    for sample, first, count in runs:
        index, end = first, first + count
        while index < end:
            g = index // group
            n = min(end, (g + 1) * group) - index
            gen.manual_seed(derive_seed(seed, sample, g, stream))
            if n == group:  # a whole group: straight into place
                torch.randn(group, numel, generator=gen, out=out[row : row + n])
            else:
                if scratch is None:
                    scratch = torch.empty(group, numel, dtype=out.dtype, device=out.device)
                torch.randn(group, numel, generator=gen, out=scratch)
                out[row : row + n] = scratch[index - g * group : index - g * group + n]
            row, index = row + n, index + n
    return out
