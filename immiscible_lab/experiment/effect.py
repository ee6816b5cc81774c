"""Effect size of noise selection against the dimension D and the candidate count k.

Monte Carlo with the library's own ``select_noise`` (torch backend) on standard-normal latents,
the case where a latent looks like noise. Reported per (D, mode, metric, k):

* ``reduction``: ``1 - |x - n_chosen|^2 / mean_j |x - n_j|^2`` (``SelectionInfo.reduction``);
* ``l2_reduction``: the same for the unsquared distance, ``1 - sqrt(1 - reduction)``;
* ``noise_std``: ``sqrt(|n|^2 / D)`` of the chosen noise (1 for N(0, I));
* ``cosine``: cos(chosen noise, latent), and ``cosine * sqrt(D)``.
"""
from __future__ import annotations

import math

import torch

DEFAULT_DIMS = (2, 64, 3072, 16384, 65536, 262144)
DEFAULT_KS = (4, 64)
#: candidate elements drawn per table cell (bounds the time of the large-D cells)
DEFAULT_BUDGET = 2**24


def _sem(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")


def effect_row(dim: int, k: int, *, mode: str = "knn", metric: str = "l2", batch: int = 16,
               seed: int = 0) -> dict:
    """One Monte-Carlo cell: ``batch`` standard-normal latents of ``dim`` elements, ``select_noise(..., k)``."""
    from immiscible import select_noise

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, dim, generator=gen)
    noise, info = select_noise(latents, k, seed=seed, mode=mode, metric=metric, backend="torch", return_info=True)
    red = info.reduction_per_sample.double()
    std = noise.double().square().mean(1).sqrt()
    cos = info.cosine.double()
    return {
        "D": dim, "mode": mode, "metric": metric, "k": k, "batch": batch,
        "reduction": float(red.mean()), "reduction_sem": _sem(red),
        "l2_reduction": float(1.0 - (1.0 - red).clamp_min(0).sqrt().mean()),
        "noise_std": float(std.mean()), "noise_std_sem": _sem(std),
        "cosine": float(cos.mean()), "cosine_sem": _sem(cos), "cosine_sqrt_d": float(cos.mean() * math.sqrt(dim)),
    }


def effect_table(dims=DEFAULT_DIMS, ks=DEFAULT_KS, *, metrics=("l2",), assign_batch: int | None = 64,
                 budget: int = DEFAULT_BUDGET, seed: int = 0, progress=None) -> list[dict]:
    """Rows for every (D, metric, k) of knn, plus ``assign`` (k = 1, batch ``assign_batch``) per D.

    The knn batch per cell is ``budget // (k * D)``, clamped to [8, 256].
    """
    rows = []
    for dim in dims:
        for metric in metrics:
            for k in ks:
                batch = max(8, min(256, budget // (k * dim)))
                rows.append(effect_row(dim, k, mode="knn", metric=metric, batch=batch, seed=seed))
                if progress:
                    progress(1)
            if assign_batch:
                rows.append(effect_row(dim, 1, mode="assign", metric=metric, batch=assign_batch, seed=seed))
                if progress:
                    progress(1)
    return rows


def format_effect_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`effect_table` rows."""
    head = ("| D | mode | metric | k | B | reduction (sq. L2) | reduction (L2) | noise std | cosine | cosine*sqrt(D) |\n"
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['D']} | {r['mode']} | {r['metric']} | {r['k']} | {r['batch']} "
                     f"| {100 * r['reduction']:.2f}% ± {100 * r['reduction_sem']:.2f} "
                     f"| {100 * r['l2_reduction']:.2f}% | {r['noise_std']:.4f} "
                     f"| {r['cosine']:.4f} | {r['cosine_sqrt_d']:.2f} |")
    return "\n".join(lines)
