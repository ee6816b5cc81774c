"""Effect size of noise selection against the dimension D and the candidate count k.

Monte Carlo with the library's own ``select_noise`` (torch backend) on standard-normal latents,
the case where a latent looks like noise. Reported per (D, mode, metric, k):

* ``reduction``: ``1 - |x - n_chosen|^2 / mean_j |x - n_j|^2`` (``SelectionInfo.reduction``);
* ``l2_reduction``: the same for the unsquared distance, ``1 - sqrt(1 - reduction)``;
* ``noise_std``: ``sqrt(|n|^2 / D)`` of the chosen noise (1 for N(0, I));
* ``cosine``: cos(chosen noise, latent), and ``cosine * sqrt(D)``;
* ``pooled_cosine``: cos(chosen noise, latent) after both are average-pooled to N x N (N the
  row's ``coarse``, else 8), for D with an image shape (``IMAGE_SHAPES``).

Coarse rows (``coarse = N``) rank candidates in the N x N-pooled space
(``select_noise(..., coarse=N)``): the full-space reduction and cosine stay small at large D,
while the pooled-space cosine (what coarse selection aligns) does not fall with D.
"""
from __future__ import annotations

import math

import torch

from .metrics import pooled_cosine

DEFAULT_DIMS = (2, 64, 3072, 16384, 65536, 262144)
DEFAULT_KS = (4, 64)
#: candidate elements drawn per table cell (bounds the time of the large-D cells)
DEFAULT_BUDGET = 2**24
#: the latent shape a D stands for: digits, the lab's patches, SD 1.5 (64x64x4), SDXL-size / Flux-ish
IMAGE_SHAPES = {64: (1, 8, 8), 768: (3, 16, 16), 3072: (3, 32, 32), 16384: (4, 64, 64), 65536: (16, 64, 64),
                262144: (16, 128, 128)}
POOLED_N = 8


def latent_shape(dim: int) -> tuple:
    """The per-sample shape used for ``dim``: an image shape from ``IMAGE_SHAPES``, else flat ``(dim,)``."""
    return IMAGE_SHAPES.get(dim, (dim,))


def _sem(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def effect_row(dim: int, k: int, *, mode: str = "knn", metric: str = "l2", batch: int = 16,
               seed: int = 0, coarse: int = 0) -> dict:
    """One Monte-Carlo cell: ``batch`` standard-normal latents of ``dim`` elements (shaped by
    :func:`latent_shape`), ``select_noise(..., k, coarse=coarse or None)``."""
    from immiscible import select_noise

    shape = latent_shape(dim)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *shape, generator=gen)
    extra = {"coarse": coarse} if coarse else {}
    noise, info = select_noise(latents, k, seed=seed, mode=mode, metric=metric, backend="torch", return_info=True,
                               **extra)
    red = info.reduction_per_sample.double()
    std = noise.double().flatten(1).square().mean(1).sqrt()
    cos = info.cosine.double()
    pooled_n = (coarse or min(POOLED_N, shape[-1])) if len(shape) == 3 else None
    return {
        "D": dim, "shape": list(shape), "mode": mode, "metric": metric, "coarse": coarse, "k": k, "batch": batch,
        "pooled_cosine": pooled_cosine(noise, latents, pooled_n) if pooled_n else float("nan"), "pooled_n": pooled_n,
        "reduction": float(red.mean()), "reduction_sem": _sem(red),
        "l2_reduction": float(1.0 - (1.0 - red).clamp_min(0).sqrt().mean()),
        "noise_std": float(std.mean()), "noise_std_sem": _sem(std),
        "cosine": float(cos.mean()), "cosine_sem": _sem(cos), "cosine_sqrt_d": float(cos.mean() * math.sqrt(dim)),
    }


def effect_table(dims=DEFAULT_DIMS, ks=DEFAULT_KS, *, metrics=("l2",), assign_batch: int | None = 64,
                 budget: int = DEFAULT_BUDGET, seed: int = 0, progress=None, coarse=()) -> list[dict]:
    """Rows for every (D, metric, k) of knn, plus ``assign`` (k = 1, batch ``assign_batch``) per D,
    plus knn-l2 coarse rows for every N in ``coarse`` that fits the D's image shape.

    The knn batch per cell is ``budget // (k * D)``, clamped to [8, 256].
    """
    rows = []
    for dim in dims:
        shape = latent_shape(dim)
        for metric in metrics:
            for k in ks:
                batch = max(8, min(256, budget // (k * dim)))
                rows.append(effect_row(dim, k, mode="knn", metric=metric, batch=batch, seed=seed))
                if progress:
                    progress(1)
                if metric != "l2" or len(shape) != 3:
                    continue
                for n in coarse:
                    if n < min(shape[-2:]):
                        rows.append(effect_row(dim, k, mode="knn", metric="l2", batch=batch, seed=seed, coarse=n))
            if assign_batch:
                rows.append(effect_row(dim, 1, mode="assign", metric=metric, batch=assign_batch, seed=seed))
                if progress:
                    progress(1)
    return rows


def format_effect_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`effect_table` rows."""
    head = ("| D | shape | mode | metric | coarse | k | B | reduction (sq. L2) | reduction (L2) | noise std | cosine "
            "| cosine*sqrt(D) | pooled cosine (N) |\n|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        shape = "x".join(map(str, r.get("shape", [r["D"]])))
        pooled = r.get("pooled_cosine", float("nan"))
        pooled = f"{pooled:.4f} ({r['pooled_n']})" if math.isfinite(pooled) else "n/a"
        lines.append(f"| {r['D']} | {shape} | {r['mode']} | {r['metric']} | {r.get('coarse') or '-'} | {r['k']} "
                     f"| {r['batch']} | {100 * r['reduction']:.2f}% ± {100 * r['reduction_sem']:.2f} "
                     f"| {100 * r['l2_reduction']:.2f}% | {r['noise_std']:.4f} "
                     f"| {r['cosine']:.4f} | {r['cosine_sqrt_d']:.2f} | {pooled} |")
    return "\n".join(lines)
