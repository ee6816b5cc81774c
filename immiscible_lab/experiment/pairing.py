"""Noise pairing arms for the A/B experiment, batched for small latents.

The library's ``select_noise`` derives one generator seed per candidate, so that any chunking gives
the same answer. On the demo's tiny latents (D = 2 or 64) that bookkeeping, not the arithmetic,
dominates. Training therefore draws all candidates of a step at once from one generator and
applies the same rule as the library (tested against ``immiscible.candidates`` +
``select_noise``): knn keeps each sample's nearest of ``k`` own candidates (squared L2, or largest
cosine); assign solves a linear assignment of the batch to a pool of ``k * B`` candidates with
``immiscible.assign.linear_assignment`` on the same costs. The library's own cost per call at the
demo's shapes is timed separately (``library_select_ms``).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from immiscible.assign import linear_assignment
from immiscible.scoring import distance_and_cosine

DEFAULT_ARMS = ("vanilla", "knn-l2-4", "knn-l2-64", "knn-cosine-4", "knn-cosine-64", "assign-l2-1")
_ARM_RE = re.compile(r"^(knn|assign)(?:-(l2|cosine))?(?:-(\d+))?$")


@dataclass(frozen=True)
class Arm:
    """One way of pairing noise with a batch: ``vanilla``, ``knn`` or ``assign``."""

    mode: str          # "vanilla" | "knn" | "assign"
    k: int = 1
    metric: str = "l2"

    @property
    def name(self) -> str:
        return "vanilla" if self.mode == "vanilla" else f"{self.mode}-{self.metric}-{self.k}"


def parse_arm(text: str) -> Arm:
    """``"vanilla"``, ``"knn-l2-64"``, ``"knn-cosine-4"``, ``"assign"`` (= ``assign-l2-1``) -> :class:`Arm`."""
    text = text.strip().lower()
    if text == "vanilla":
        return Arm("vanilla")
    m = _ARM_RE.match(text)
    if not m:
        raise ValueError(f"arm must be 'vanilla', 'knn-{{l2,cosine}}-K' or 'assign[-{{l2,cosine}}[-K]]', got {text!r}")
    mode, metric, k = m.group(1), m.group(2) or "l2", int(m.group(3) or (1 if m.group(1) == "assign" else 0))
    if k < 1:
        raise ValueError(f"arm {text!r}: knn needs a candidate count, e.g. 'knn-l2-64'")
    return Arm(mode, k, metric)


def nearest_candidate(x: torch.Tensor, cands: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Index of each sample's chosen candidate.

    Parameters
    ----------
    x : Tensor, shape (B, D)
    cands : Tensor, shape (B, k, D)
    metric : {"l2", "cosine"}
        Smallest squared distance, or largest cosine.

    Returns
    -------
    LongTensor, shape (B,)
    """
    x_sq = x.square().sum(-1, keepdim=True)
    dist, cos = distance_and_cosine(x_sq, cands.square().sum(-1), torch.einsum("bd,bkd->bk", x, cands))
    return torch.argmin(dist, dim=1) if metric == "l2" else torch.argmax(cos, dim=1)


def assign_pool(x: torch.Tensor, pool: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Distinct pool member per sample minimizing the summed cost; ``x`` (B, D), ``pool`` (P, D) -> (B,)."""
    x_sq = x.square().sum(-1, keepdim=True)
    dist, cos = distance_and_cosine(x_sq, pool.square().sum(-1)[None], x @ pool.T)
    return linear_assignment(dist if metric == "l2" else 1.0 - cos)


def pair_noise(x: torch.Tensor, arm: Arm, *, generator: torch.Generator) -> torch.Tensor:
    """Noise ``(B, D)`` paired with flat latents ``x`` (B, D) under ``arm``, drawn from ``generator``."""
    batch, dim = x.shape
    if arm.mode == "vanilla":
        return torch.randn(batch, dim, generator=generator)
    if arm.mode == "knn":
        cands = torch.randn(batch, arm.k, dim, generator=generator)
        index = nearest_candidate(x, cands, arm.metric)
        return cands[torch.arange(batch), index]
    pool = torch.randn(arm.k * batch, dim, generator=generator)
    return pool[assign_pool(x, pool, arm.metric)]


def library_select_ms(arm: Arm, batch: int, dim: int, *, repeats: int = 3, seed: int = 0) -> float:
    """Wall-clock ms of one ``immiscible.select_noise`` call (torch backend) at this shape; 0 for vanilla."""
    if arm.mode == "vanilla":
        return 0.0
    from immiscible import select_noise

    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
    select_noise(x, arm.k, seed=seed, mode=arm.mode, metric=arm.metric, backend="torch")  # warm-up
    start = time.perf_counter()
    for i in range(repeats):
        select_noise(x, arm.k, seed=seed + 1 + i, mode=arm.mode, metric=arm.metric, backend="torch")
    return (time.perf_counter() - start) / repeats * 1e3
