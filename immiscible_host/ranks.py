"""Rank-aware selection seeds.

The selection seed comes from the host's own stock draw (:func:`seed_from_draw`), so selection
consumes none of the host's random numbers. Trainers seed every accelerate rank alike (sd-scripts'
``--seed``), so that seed can be the same on every rank; mixing in the rank gives each rank its own
candidate pool, while a single process keeps the seed unchanged.

With ``--immiscible_scope global`` the seed is not mixed: the core takes rank 0's seed for every
process of the group (``select_noise(..., group=process_group("global"))``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

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
    drawn: int       # from the host's stock draw (``--seed`` governs it), or drawn from torch's default generator
    seed: int        # what selection uses: ``drawn``, or ``derive_seed(drawn, rank)`` on several ranks
    rank: int
    world_size: int


def seed_from_draw(stock) -> int:
    """A 63-bit selection seed that is a function of the host's own draw ``stock`` (its first four
    values' bits and its size), so that selecting consumes none of the host's random numbers and a
    run's ``--seed`` still governs it."""
    head = stock.detach().reshape(-1)[:4].to("cpu", torch.float32).contiguous().view(torch.int32).tolist()
    return immiscible.derive_seed(stock.numel(), *head)   # derive_seed masks each to 64 bits


def draw_rank_seed(stock=None, scope: str = "rank") -> RankSeed:
    """One selection seed, from the host's stock draw (``stock``; None: drawn from torch's default
    generator, which consumes it), with this process's rank mixed in (``scope="rank"``; with
    ``"global"`` it is left as drawn: rank 0's is broadcast to every process)."""
    drawn = immiscible.draw_seed() if stock is None else seed_from_draw(stock)
    rank, world = distributed_rank()
    mixed = world > 1 and scope == "rank"
    return RankSeed(drawn, immiscible.derive_seed(drawn, rank) if mixed else drawn, rank, world)


def process_group(scope: str):
    """The process group a selection of ``scope`` runs over: torch.distributed's default group for
    ``"global"`` when several processes are initialized, else None (this process alone)."""
    if scope != "global":
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None
