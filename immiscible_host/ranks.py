"""Rank-aware selection seeds.

Trainers seed every accelerate rank alike (sd-scripts' ``--seed``), so a seed drawn from torch's
default generator is the same on every rank; mixing in the rank gives each rank its own
candidate pool, while a single process keeps the drawn seed unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import immiscible


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (torch.distributed if initialized, else env)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - fall through to the environment
        pass
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclass(frozen=True)
class RankSeed:
    drawn: int       # drawn from torch's default generator (``--seed`` governs it)
    seed: int        # what selection uses: ``drawn``, or ``derive_seed(drawn, rank)`` on several ranks
    rank: int
    world_size: int


def draw_rank_seed() -> RankSeed:
    """Draw one selection seed from torch's default generator and mix in this process's rank."""
    drawn = immiscible.draw_seed()
    rank, world = distributed_rank()
    return RankSeed(drawn, immiscible.derive_seed(drawn, rank) if world > 1 else drawn, rank, world)
