"""Coarse selection: rank candidates by their low frequencies only.

``pooled`` average-pools a flat batch of samples of shape ``(..., H, W)`` to ``(..., N, N)``
with ``adaptive_avg_pool2d`` semantics (H and W need not divide by N) and flattens it again.
Selection with ``coarse=N`` scores latent and candidates in that pooled space and keeps the
full-resolution candidate, so the noise's fine detail stays an ordinary Gaussian draw while its
layout moves toward the latent's.

Pooling is linear, so the pooled candidate is still Gaussian (each cell the mean of its
``h * w`` elements, standard deviation ``1 / sqrt(h * w)``). The best pooled cosine that k
candidates reach is about ``E[max of k normals] / sqrt(C * N^2)``: it depends on ``k`` and the
pooled size, not on ``D``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from . import checks

#: ``project(flat)``: fp32 ``[n, D]`` -> ``[n, P]``, the space candidates are ranked in.
Projection = Callable[[torch.Tensor], torch.Tensor]


def pooled(flat: torch.Tensor, sample_shape, size: int) -> torch.Tensor:
    """Samples ``flat [n, D]`` of ``sample_shape (..., H, W)`` average-pooled to ``(..., size, size)``, as ``[n, P]``."""
    height, width = sample_shape[-2], sample_shape[-1]
    lead = math.prod(sample_shape[:-2])
    grid = flat.reshape(flat.shape[0], lead, height, width)
    return F.adaptive_avg_pool2d(grid, size).reshape(flat.shape[0], -1)


def pooling(sample_shape, size: int | None) -> Projection | None:
    """The projection of ``coarse=size`` for samples of ``sample_shape``; None when it is off."""
    if size is None:
        return None
    shape = tuple(sample_shape)
    return lambda flat: pooled(flat, shape, size)


def coarse_pool(latents: torch.Tensor, size: int) -> torch.Tensor:
    """``latents [B, ..., H, W]`` average-pooled to ``size x size`` as fp32 ``[B, P]``: the space that
    ``select_noise(..., coarse=size)`` ranks in (for statistics of other noise in that space).

    ``latents`` as ``select_noise`` takes them (dense, ``LATENT_DTYPES``; values are not checked);
    ``size`` in ``[1, min(H, W)]``. Anything else raises ``TypeError``/``ValueError`` naming it.
    """
    checks.check_tensor(latents)
    if latents.dim() < 3:
        raise ValueError(f"coarse_pool needs latents [B, ..., H, W] with two spatial dimensions, "
                         f"got shape {tuple(latents.shape)}")
    height, width = latents.shape[-2:]
    checks.check_int("size", size, 1, min(height, width), f" (N x N pooling of a {height} x {width} latent)")
    flat = latents.detach().reshape(latents.shape[0], -1).to(torch.float32)
    return pooled(flat, latents.shape[1:], size)
