"""Data sets that ship with an installed package, so the demo downloads nothing.

``gmm``    : a 2-D mixture of 8 Gaussians on a ring, drawn with a fixed seed (D = 2).
``digits`` : scikit-learn's ``load_digits`` 8x8 images scaled to [-1, 1] (D = 64, 1797 images).

Each data set comes with a fixed feature map (identity for ``gmm``, a PCA fit on the training
split for ``digits``) in which sample quality is measured.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DATASETS = ("gmm", "digits")


@dataclass(frozen=True)
class Dataset:
    """A training split, a held-out split and the fixed space quality is measured in.

    Attributes
    ----------
    name : str
    train : Tensor, shape (N_train, D)
    holdout : Tensor, shape (N_holdout, D)
    features : callable, Tensor (N, D) -> Tensor (N, F)
        Fixed for the whole experiment (never refit on generated samples).
    quality : str
        ``"w2"`` (exact Wasserstein-2 in data space) or ``"fd"`` (Frechet distance on features).
    """

    name: str
    train: torch.Tensor
    holdout: torch.Tensor
    features: Callable[[torch.Tensor], torch.Tensor]
    quality: str

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])


def gaussian_mixture(n: int, *, generator: torch.Generator, modes: int = 8, radius: float = 2.0,
                     std: float = 0.25) -> torch.Tensor:
    """``n`` points from ``modes`` isotropic Gaussians evenly spaced on a circle -> (n, 2)."""
    which = torch.randint(0, modes, (n,), generator=generator)
    angle = which.to(torch.float32) * (2.0 * math.pi / modes)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * torch.randn(n, 2, generator=generator)


def pca_projection(x: torch.Tensor, components: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed linear feature map: centre on ``x``'s mean, project on its top principal axes."""
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd((x - mean).double(), full_matrices=False)
    axes = vh[:components].T.to(torch.float32)  # (D, F)

    def features(y: torch.Tensor) -> torch.Tensor:
        return (y - mean) @ axes

    return features


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def load_gmm(*, seed: int = 0, n_train: int = 8192, n_holdout: int = 1024) -> Dataset:
    """The 2-D ring of 8 Gaussians; train and held-out draws use separate fixed seeds."""
    train = gaussian_mixture(n_train, generator=torch.Generator().manual_seed(seed))
    holdout = gaussian_mixture(n_holdout, generator=torch.Generator().manual_seed(seed + 1))
    return Dataset("gmm", train, holdout, identity, "w2")


def load_digits_dataset(*, seed: int = 0, n_holdout: int = 397, pca_components: int = 16) -> Dataset:
    """scikit-learn's 8x8 digits in [-1, 1], a fixed random held-out split, PCA-``pca_components`` features."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the digits data set needs scikit-learn: pip install 'immiscible-diffusion[demo]' "
                          "(or: pip install scikit-learn)") from exc
    images = torch.from_numpy(load_digits().data).to(torch.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    holdout, train = images[order[:n_holdout]], images[order[n_holdout:]]
    return Dataset("digits", train, holdout, pca_projection(train, pca_components), "fd")


def load_dataset(name: str, *, seed: int = 0) -> Dataset:
    if name == "gmm":
        return load_gmm(seed=seed)
    if name == "digits":
        return load_digits_dataset(seed=seed)
    raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}, got {name!r}")
