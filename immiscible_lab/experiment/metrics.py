"""Distances between sample sets, computed in a fixed space, and flow straightness.

All functions are pure, take float tensors of shape ``(N, D)`` (``pooled_cosine``: image-shaped
``(N, ..., H, W)``) and return Python floats.
"""
from __future__ import annotations

import numpy as np
import torch

from immiscible import coarse_pool


def w2_exact(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact Wasserstein-2 distance between two equal-size empirical measures.

    With ``N`` points each and uniform weights the optimal plan is a permutation, found by
    ``scipy.optimize.linear_sum_assignment`` on squared Euclidean costs.

    Parameters
    ----------
    x, y : Tensor, shape (N, D)

    Returns
    -------
    float
        ``sqrt(min_perm mean_i |x_i - y_perm(i)|^2)``.
    """
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"w2_exact needs two (N, D) tensors of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.double(), y.double()).square().numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, *, bandwidth: float = 1.0) -> float:
    """Squared maximum mean discrepancy with kernel ``exp(-|a - b|^2 / (2 bandwidth^2))``.

    The biased (V-statistic) estimator: exactly 0 for identical sample sets, never negative.

    Parameters
    ----------
    x : Tensor, shape (N, D)
    y : Tensor, shape (M, D)
    """
    return mmd_rbf_multi(x, y, (bandwidth,))


def mmd_rbf_multi(x: torch.Tensor, y: torch.Tensor, bandwidths) -> float:
    """Mean of :func:`mmd_rbf` over several kernel bandwidths (each scale weighs the same).

    Parameters
    ----------
    x : Tensor, shape (N, F)
    y : Tensor, shape (M, F)
    bandwidths : sequence of float
    """
    bandwidths = tuple(bandwidths)
    if not bandwidths:
        raise ValueError("mmd_rbf_multi needs at least one bandwidth")
    x, y = x.double(), y.double()
    dxx, dyy, dxy = torch.cdist(x, x).square(), torch.cdist(y, y).square(), torch.cdist(x, y).square()
    total = 0.0
    for b in bandwidths:
        g = 1.0 / (2.0 * float(b) ** 2)
        value = torch.exp(-g * dxx).mean() + torch.exp(-g * dyy).mean() - 2.0 * torch.exp(-g * dxy).mean()
        total += float(value.clamp_min(0.0))
    return total / len(bandwidths)


def gaussian_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of ``x`` in float64."""
    x = x.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0.0).sqrt()) @ v.T


def frechet_gaussian(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Squared W2 between two Gaussians (the Frechet distance of FID).

    ``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1^{1/2} cov2 cov1^{1/2})^{1/2})``.
    """
    root1 = _sqrtm_psd(cov1)
    cross = _sqrtm_psd(root1 @ cov2 @ root1)
    value = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * torch.trace(cross)
    return float(value.clamp_min(0.0))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fit to feature sets ``x`` (N, F) and ``y`` (M, F)."""
    return frechet_gaussian(*gaussian_moments(x), *gaussian_moments(y))


def pooled_cosine(x: torch.Tensor, y: torch.Tensor, size: int) -> float:
    """Mean cosine between ``x`` and ``y`` (``[B, ..., H, W]``) after both are average-pooled to
    ``size x size`` over the last two dimensions (``immiscible.coarse_pool``: the space coarse selection
    ranks in)."""
    return float(torch.nn.functional.cosine_similarity(coarse_pool(x, size).double(), coarse_pool(y, size).double(),
                                                       dim=1).mean())


def straightness_gap(x_one_step: torch.Tensor, x_many_steps: torch.Tensor) -> float:
    """Mean ``|x_1 - x_n|^2 / D`` between a 1-step and a many-step solve from the same noise.

    Zero for perfectly straight trajectories, where one Euler step lands where many do.
    """
    return float((x_one_step.double() - x_many_steps.double()).square().mean())


def sample_quality(generated: torch.Tensor, reference: torch.Tensor, kind: str, features=None,
                   bandwidths=()) -> float:
    """``"w2"``: exact W2 on ``min(N, M)`` points each; ``"fd"``: Frechet distance on ``features(.)``;
    ``"mmd"``: :func:`mmd_rbf_multi` on ``features(.)`` with ``bandwidths``.

    Non-finite values of a diverged sampler count as 1e6 (far from every data point), so the
    score stays finite (MMD² saturates) and comparable.
    """
    generated = torch.nan_to_num(generated, nan=1e6, posinf=1e6, neginf=-1e6)
    if kind == "w2":
        n = min(generated.shape[0], reference.shape[0])
        return w2_exact(generated[:n], reference[:n])
    if kind == "fd":
        f = features or (lambda t: t)
        return frechet_distance(f(generated), f(reference))
    if kind == "mmd":
        f = features or (lambda t: t)
        return mmd_rbf_multi(f(generated), f(reference), bandwidths)
    raise ValueError(f"quality kind must be 'w2', 'fd' or 'mmd', got {kind!r}")


def dataset_quality(data, generated: torch.Tensor, reference: torch.Tensor) -> float:
    """The quality metric of a :class:`~immiscible_lab.experiment.data.Dataset` (lower is better)."""
    return sample_quality(generated, reference, data.quality, data.features, data.bandwidths)
