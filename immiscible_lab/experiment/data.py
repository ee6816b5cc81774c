"""Data sets that ship with an installed package, so the demo downloads nothing.

``gmm``       : a 2-D mixture of 8 Gaussians on a ring, drawn with a fixed seed (D = 2).
``digits``    : scikit-learn's ``load_digits`` 8x8 images in [-1, 1], shape (1, 8, 8) (D = 64).
``patches16`` : 16x16 RGB patches of the two photos in ``sklearn.datasets.load_sample_images``
                (D = 768); ``patches32``: 32x32 RGB patches of the same photos (D = 3072).

Samples are stored flat, ``(N, D)``; ``Dataset.shape`` is the per-sample image shape that
coarse selection pools over. Quality is measured in a fixed space, fit once on the training split:
exact W2 in data space for ``gmm``; for images an RBF MMD² (two bandwidths, multiples of the
median feature distance) on features that a Gaussian with the data's mean and covariance fails: for digits the
penultimate layer of a small classifier trained on the training split's labels
(:func:`digit_classifier_features`), for patches PCA-32 scaled by the square root of each axis'
standard deviation (:func:`pca_projection`, ``whiten=0.5``).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

DATASETS = ("gmm", "digits", "patches16", "patches32")
#: a data set's family: rows of the robustness matrix pool the sizes of one family
FAMILY = {"gmm": "gmm", "digits": "digits", "patches16": "patches", "patches32": "patches"}
#: patch side -> (block side, patch stride) of the fixed split (see :func:`image_patches`)
PATCH_LAYOUT = {16: (32, 4), 32: (48, 4)}
#: PCA components of the patches' quality features
PCA_COMPONENTS = {"patches16": 32, "patches32": 32}
#: RBF bandwidths of the image MMD, in units of the median pairwise feature distance (the scales at
#: which held-out data and the moment-matched Gaussian separate most, measured on the training split)
BANDWIDTH_SCALES = {"digits": (0.5, 1.0), "patches16": (1.0, 2.0), "patches32": (1.0, 2.0)}


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
        ``"w2"`` (exact Wasserstein-2 in data space) or ``"mmd"`` (RBF MMD² on ``features``).
    shape : tuple of int
        The shape of one sample: ``(2,)`` for gmm, ``(C, H, W)`` for images.
    bandwidths : tuple of float
        The RBF bandwidths of ``"mmd"`` (fixed from the training split).
    """

    name: str
    train: torch.Tensor
    holdout: torch.Tensor
    features: Callable[[torch.Tensor], torch.Tensor]
    quality: str
    shape: tuple = ()
    bandwidths: tuple = ()

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    @property
    def side(self) -> int | None:
        """H (= W) of an image data set, None otherwise."""
        return int(self.shape[-1]) if self.is_image else None

    @property
    def family(self) -> str:
        return FAMILY.get(self.name, self.name)


def gaussian_mixture(n: int, *, generator: torch.Generator, modes: int = 8, radius: float = 2.0,
                     std: float = 0.25) -> torch.Tensor:
    """``n`` points from ``modes`` isotropic Gaussians evenly spaced on a circle -> (n, 2)."""
    which = torch.randint(0, modes, (n,), generator=generator)
    angle = which.to(torch.float32) * (2.0 * math.pi / modes)
    centers = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centers + std * torch.randn(n, 2, generator=generator)


def pca_projection(x: torch.Tensor, components: int, *, whiten: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed linear feature map: centre on ``x``'s mean, project on its top principal axes.

    Each axis is divided by ``std ** whiten`` (``x``'s standard deviation along it): 0 keeps the
    data's scale, 1 whitens (a Gaussian fit of ``x`` maps to N(0, I)), 0.5 is between: low-variance
    (fine-detail) axes count more than in the raw data, without amplifying them to full weight.
    """
    mean = x.mean(0)
    s, axes = top_principal_axes(x - mean, components)
    axes = axes.to(torch.float32)  # (D, F)
    if whiten:
        std = (s / math.sqrt(max(1, x.shape[0] - 1))).to(torch.float32).clamp_min(1e-6)
        axes = axes / std**whiten

    def features(y: torch.Tensor) -> torch.Tensor:
        return (y - mean) @ axes

    return features


def top_principal_axes(xc: torch.Tensor, components: int, *, seed: int = 0, oversample: int = 16,
                       power_iters: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``components`` singular values ``(F,)`` and right singular vectors ``(D, F)`` of centred ``xc`` (N, D).

    An exact SVD for small D; for D > 256 a seeded randomized range finder (Halko et al., 2011)
    with power iterations, in float64: seconds instead of a minute at D = 3072, and deterministic.
    """
    xc = xc.double()
    if xc.shape[1] <= 256:
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        return s[:components], vh[:components].T
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(xc.shape[1], components + oversample, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(xc @ omega)
    for _ in range(power_iters):
        q, _ = torch.linalg.qr(xc.T @ q)
        q, _ = torch.linalg.qr(xc @ q)
    _, s, vh = torch.linalg.svd(q.T @ xc, full_matrices=False)
    signs = torch.sign(vh[:components].sum(1, keepdim=True)).clamp_min(0) * 2 - 1  # a fixed sign per axis
    return s[:components], (vh[:components] * signs).T


def median_distance(f: torch.Tensor, n: int = 1000) -> float:
    """Median pairwise Euclidean distance of the first ``n`` rows of ``f`` (the kernel-scale heuristic)."""
    return float(torch.pdist(f[:n].double()).median())


def bandwidths_for(name: str, features: Callable, train: torch.Tensor) -> tuple[float, ...]:
    """The image MMD's RBF bandwidths: ``BANDWIDTH_SCALES[name]`` x the median feature distance of ``train``."""
    med = median_distance(features(train))
    return tuple(s * med for s in BANDWIDTH_SCALES[name])


def digit_classifier_features(train: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, steps: int = 1000,
                              width: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    """The penultimate layer (``width`` SiLU units) of an MLP classifier trained on ``train``'s digit labels.

    Trained once, deterministically (its own generator, Adam 1e-3, batch 128, ``steps`` steps;
    about 98% held-out accuracy), then frozen.
    """
    gen = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(train.shape[1], 256), torch.nn.Linear(256, width), torch.nn.Linear(width, 10)]
    with torch.no_grad():
        for layer in layers:
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    net = torch.nn.Sequential(layers[0], torch.nn.SiLU(), layers[1], torch.nn.SiLU(), layers[2])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, train.shape[0], (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(net(train[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    body = net[:4].requires_grad_(False).eval()

    def features(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return body(y)

    features.classifier = net  # for the accuracy check in the tests
    return features


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def load_gmm(*, seed: int = 0, n_train: int = 8192, n_holdout: int = 1024) -> Dataset:
    """The 2-D ring of 8 Gaussians; train and held-out draws use separate fixed seeds."""
    train = gaussian_mixture(n_train, generator=torch.Generator().manual_seed(seed))
    holdout = gaussian_mixture(n_holdout, generator=torch.Generator().manual_seed(seed + 1))
    return Dataset("gmm", train, holdout, identity, "w2", shape=(2,))


def _sklearn():
    try:
        import sklearn.datasets
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the image data sets need scikit-learn: pip install 'immiscible-diffusion[demo]' "
                          "(or: pip install scikit-learn)") from exc
    return sklearn.datasets


def load_digits_dataset(*, seed: int = 0, n_holdout: int = 397) -> Dataset:
    """scikit-learn's 8x8 digits in [-1, 1] as (1, 8, 8) images, a fixed random held-out split."""
    raw = _sklearn().load_digits()
    images = torch.from_numpy(raw.data).to(torch.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    labels = torch.from_numpy(raw.target).long()
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    holdout, train = images[order[:n_holdout]], images[order[n_holdout:]]
    features = digit_classifier_features(train, labels[order[n_holdout:]], seed=seed)
    features.holdout_labels = labels[order[:n_holdout]]
    return Dataset("digits", train, holdout, features, "mmd", shape=(1, 8, 8),
                   bandwidths=bandwidths_for("digits", features, train))


def image_patches(size: int, *, seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` x ``size`` RGB patches of scikit-learn's two sample photos, in [-1, 1] -> (train, holdout).

    Each photo (427 x 640) is cut into square blocks (``PATCH_LAYOUT``: 32 px for 16-px patches,
    48 px for 32-px patches); a fixed random ``test_fraction`` of the blocks (seeded) is held out.
    Patches are taken inside each block at a stride of 4 px, so no held-out pixel is ever
    trained on, and both splits come from the same places in the same photos.
    """
    block, stride = PATCH_LAYOUT[size]
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for img in _sklearn().load_sample_images().images:
        x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W)
        rows, cols = x.shape[1] // block, x.shape[2] // block
        held = torch.rand(rows * cols, generator=gen) < test_fraction
        for i in range(rows):
            for j in range(cols):
                b = x[:, i * block:(i + 1) * block, j * block:(j + 1) * block]
                p = b.unfold(1, size, stride).unfold(2, size, stride).permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)
                (test if held[i * cols + j] else train).append(p)
    return torch.cat(train).flatten(1).contiguous(), torch.cat(test).flatten(1).contiguous()


def load_patches_dataset(size: int, *, seed: int = 0) -> Dataset:
    name = f"patches{size}"
    train, holdout = image_patches(size, seed=seed)
    # A fixed shuffle of the held-out set, so its first eval_samples cover both photos.
    holdout = holdout[torch.randperm(holdout.shape[0], generator=torch.Generator().manual_seed(seed + 1))]
    features = pca_projection(train, PCA_COMPONENTS[name], whiten=0.5)
    return Dataset(name, train, holdout, features, "mmd", shape=(3, size, size),
                   bandwidths=bandwidths_for(name, features, train))


@functools.lru_cache(maxsize=8)
def load_dataset(name: str, *, seed: int = 0) -> Dataset:
    """A data set by name (cached per process: they are fixed)."""
    if name == "gmm":
        return load_gmm(seed=seed)
    if name == "digits":
        return load_digits_dataset(seed=seed)
    if name in ("patches16", "patches32"):
        return load_patches_dataset(int(name[7:]), seed=seed)
    raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}, got {name!r}")


def dataset_shape(name: str) -> tuple:
    """The per-sample shape of a data set, without loading it."""
    return {"gmm": (2,), "digits": (1, 8, 8), "patches16": (3, 16, 16), "patches32": (3, 32, 32)}[name]


def moment_matched_gaussian(data: Dataset, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` draws from the Gaussian with the training split's mean and covariance -> (n, D).

    The baseline every model must beat: it has the data's first two moments and nothing else.
    """
    x = data.train.double()
    mean = x.mean(0)
    # z @ (x - mean) / sqrt(N - 1) with z ~ N(0, I_N) is exactly N(0, sample covariance), without a D x D root
    z = torch.randn(n, x.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mean + z @ (x - mean) / math.sqrt(x.shape[0] - 1)).to(torch.float32)
