"""Candidate noise from torch's own generators, one counter-derived seed per candidate.

Candidate ``(sample, index)`` of a given ``seed`` is ``torch.randn(D)`` from a generator seeded
with ``derive_seed(seed, sample, index, stream)``. It depends on nothing else: not on ``k``, the
batch size, the chunk size or the memory budget. So the candidates for ``k=4`` are the first four
of those for ``k=64``, and any chunking gives the same selection.
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


def fill_candidates(out: torch.Tensor, seed: int, rows: list[tuple[int, int]], stream: int) -> torch.Tensor:
    """Write candidate ``rows[i] = (sample, index)`` into ``out[i]`` (fp32, shape ``[len(rows), D]``)."""
    gen = _generator(out.device)
    for i, (sample, index) in enumerate(rows):
        gen.manual_seed(derive_seed(seed, sample, index, stream))
        torch.randn(out.shape[1], generator=gen, out=out[i])
    return out
