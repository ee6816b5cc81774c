"""Noise pairing arms for the A/B experiment: vanilla, or ``immiscible.select_noise`` itself.

Training pairs noise through the library (knn: each sample's nearest of ``k`` own candidates by
squared L2 or cosine; assign: a linear assignment of the batch to a pool of ``k * B``), so what
the demo measures is what a trainer gets. The library's cost per call at the demo's shapes is
also timed on its own (``library_select_ms``).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from immiscible import draw_seed, select_noise

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


def pair_noise(x: torch.Tensor, arm: Arm, *, generator: torch.Generator) -> torch.Tensor:
    """Noise ``(B, D)`` paired with flat latents ``x`` (B, D) under ``arm``.

    Vanilla draws ``torch.randn`` from ``generator``; knn and assign draw one seed from it and
    call ``immiscible.select_noise`` (torch backend), so the demo trains on exactly what the
    library gives a trainer.
    """
    batch, dim = x.shape
    if arm.mode == "vanilla":
        return torch.randn(batch, dim, generator=generator)
    seed = draw_seed(generator)
    return select_noise(x, arm.k, seed=seed, mode=arm.mode, metric=arm.metric, backend="torch")


def library_select_ms(arm: Arm, batch: int, dim: int, *, repeats: int = 3, seed: int = 0) -> float:
    """Wall-clock ms of one ``immiscible.select_noise`` call (torch backend) at this shape; 0 for vanilla."""
    if arm.mode == "vanilla":
        return 0.0
    x = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))
    select_noise(x, arm.k, seed=seed, mode=arm.mode, metric=arm.metric, backend="torch")  # warm-up
    start = time.perf_counter()
    for i in range(repeats):
        select_noise(x, arm.k, seed=seed + 1 + i, mode=arm.mode, metric=arm.metric, backend="torch")
    return (time.perf_counter() - start) / repeats * 1e3
