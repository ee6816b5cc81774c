"""Noise pairing arms for the A/B experiment: vanilla, or ``immiscible.select_noise`` itself.

Training pairs noise through the library (knn: each sample's nearest of ``k`` own candidates by
squared L2 or cosine; assign: a linear assignment of the batch to a pool of ``k * B``; coarse:
the same ranking after both are average-pooled to N x N), so what the demo measures is what a
trainer gets. The library's cost per call at the demo's shapes is
also timed on its own (``library_select_ms``).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from immiscible import draw_seed, select_noise

DEFAULT_ARMS = ("vanilla", "knn-l2-4", "knn-l2-64", "knn-cosine-4", "knn-cosine-64", "assign-l2-1")
_ARM_RE = re.compile(r"^(knn|assign)(?:-coarse(\d+))?(?:-(l2|cosine))?(?:-(\d+))?$")


@dataclass(frozen=True)
class Arm:
    """One way of pairing noise with a batch: ``vanilla``, ``knn`` or ``assign``, optionally coarse.

    ``coarse = N > 0`` ranks candidates after latent and candidates are average-pooled to N x N
    over the last two dimensions (``select_noise(..., coarse=N)``); 0 is off.
    """

    mode: str          # "vanilla" | "knn" | "assign"
    k: int = 1
    metric: str = "l2"
    coarse: int = 0

    @property
    def name(self) -> str:
        if self.mode == "vanilla":
            return "vanilla"
        if self.coarse:
            metric = "" if self.metric == "l2" else f"-{self.metric}"
            return f"{self.mode}-coarse{self.coarse}{metric}-{self.k}"
        return f"{self.mode}-{self.metric}-{self.k}"

    def applies_to(self, shape: tuple) -> bool:
        """Whether the arm is meaningful for samples of this shape: coarse needs images larger than
        N x N (pooling an N x N image to N x N is the identity, i.e. plain knn)."""
        if not self.coarse:
            return True
        return len(shape) >= 3 and self.coarse < min(shape[-2:])


def parse_arm(text: str) -> Arm:
    """``"vanilla"``, ``"knn-l2-64"``, ``"knn-cosine-4"``, ``"assign"`` (= ``assign-l2-1``),
    ``"knn-coarse8-4"`` (L2 in 8x8-pooled space), ``"knn-coarse4-cosine-16"`` -> :class:`Arm`."""
    text = text.strip().lower()
    if text == "vanilla":
        return Arm("vanilla")
    m = _ARM_RE.match(text)
    if not m:
        raise ValueError(f"arm must be 'vanilla', 'knn[-coarseN]-{{l2,cosine}}-K' or "
                         f"'assign[-coarseN][-{{l2,cosine}}[-K]]', got {text!r}")
    mode, coarse, metric = m.group(1), int(m.group(2) or 0), m.group(3) or "l2"
    k = int(m.group(4) or (1 if mode == "assign" else 0))
    if k < 1:
        raise ValueError(f"arm {text!r}: knn needs a candidate count, e.g. 'knn-l2-64'")
    if m.group(2) is not None and coarse < 1:
        raise ValueError(f"arm {text!r}: coarse needs N >= 1, e.g. 'knn-coarse8-4'")
    return Arm(mode, k, metric, coarse)


def _select(x: torch.Tensor, arm: Arm, seed: int, **kwargs):
    return select_noise(x, arm.k, seed=seed, mode=arm.mode, metric=arm.metric, backend="torch",
                        **({"coarse": arm.coarse} if arm.coarse else {}), **kwargs)


def pair_noise(x: torch.Tensor, arm: Arm, *, generator: torch.Generator, shape: tuple | None = None) -> torch.Tensor:
    """Noise ``(B, D)`` paired with flat latents ``x`` (B, D) under ``arm``.

    Vanilla draws ``torch.randn`` from ``generator``; knn and assign draw one seed from it and
    call ``immiscible.select_noise`` (torch backend) on ``x`` viewed as ``(B, *shape)`` (the
    image shape coarse selection pools over), so the demo trains on exactly what the library
    gives a trainer.
    """
    batch, dim = x.shape
    if arm.mode == "vanilla":
        return torch.randn(batch, dim, generator=generator)
    seed = draw_seed(generator)
    shaped = x.view(batch, *shape) if shape else x
    return _select(shaped, arm, seed).reshape(batch, dim)


def library_select_ms(arm: Arm, batch: int, shape: tuple, *, repeats: int = 3, seed: int = 0) -> float:
    """Wall-clock ms of one ``immiscible.select_noise`` call (torch backend) at this shape; 0 for vanilla."""
    if arm.mode == "vanilla" or not arm.applies_to(shape):
        return 0.0
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
    _select(x, arm, seed)  # warm-up
    start = time.perf_counter()
    for i in range(repeats):
        _select(x, arm, seed + 1 + i)
    return (time.perf_counter() - start) / repeats * 1e3
