"""The public API: ``select_noise`` and ``candidates``.

KNN (Improved Immiscible Diffusion, arXiv 2505.18521): for each sample, the nearest of ``k``
Gaussian candidates of its own. Assign (Immiscible Diffusion, NeurIPS 2024, arXiv 2406.12303):
a pool of ``k * B`` candidates and a linear assignment of the batch to distinct pool members.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import checks
from .assign import linear_assignment
from .backends import BACKENDS
from .seeding import draw_seed

logger = logging.getLogger(__name__)


@dataclass
class SelectionInfo:
    """What a selection chose, per sample (tensors on the latents' device).

    Distances are squared L2 in fp32, whatever ``metric`` chose by; cosines are between a
    candidate and the latent. ``distances`` and ``cosines`` hold every candidate's score
    (``[B, k]`` for knn, ``[B, k * B]`` against the whole pool for assign), so callers that show
    statistics never recompute them.
    """

    index: torch.Tensor          # [B] long: the chosen candidate (knn) or pool member (assign)
    distance: torch.Tensor       # [B] squared distance to the chosen noise
    mean_distance: torch.Tensor  # [B] mean squared distance over the sample's candidates
    cosine: torch.Tensor         # [B] cosine(chosen noise, latent)
    seed: int
    k: int
    mode: str
    metric: str
    backend: str                 # the backend that actually ran
    distances: torch.Tensor | None = None  # [B, C] squared distance to every candidate
    cosines: torch.Tensor | None = None    # [B, C] cosine to every candidate
    sample_ids: list[int] | None = None    # the ids the candidates were keyed by

    @property
    def reduction_per_sample(self) -> torch.Tensor:
        return 1.0 - self.distance / self.mean_distance.clamp_min(1e-30)

    @property
    def reduction(self) -> float:
        """``1 - distance / mean_distance``, averaged over the batch."""
        return float(self.reduction_per_sample.mean())


# --------------------------------------------------------------------------- backends


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not interpreting:
        return False, f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "backend='triton' needs triton: pip install 'immiscible-diffusion[triton]' (or: pip install triton)"
    return True, ""


#: Set when a backend failed at run time: from then on this process uses torch instead.
_disabled: dict[str, str] = {}


def disabled_backends() -> dict[str, str]:
    """Backends this process stopped using after a run-time failure, with the reason."""
    return dict(_disabled)


def reset_fallback() -> None:
    """Try the failed backends again (after fixing what made them fail, or in tests)."""
    _disabled.clear()


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA when triton imports, else ``"torch"``.

    An explicit ``"triton"`` that cannot run raises ``ValueError`` / ``ImportError`` at once. A
    backend that failed at run time in this process resolves to ``"torch"`` (see ``select_noise``).
    """
    checks.check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_usable(device)[0] else "torch"
    elif backend == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            raise (ImportError if "pip install" in why else ValueError)(why)
    return "torch" if backend in _disabled else backend


def _select(backend, x, k, mode, metric, chunk_bytes, with_cosines=True):
    """``noise, index, distances, cosines`` for fp32 ``x [B, D]`` (knn cosines only when asked or needed)."""
    if mode == "knn":
        return backend.knn(x, k, metric, chunk_bytes, with_cosines)
    pool = k * x.shape[0]
    dist, cos = backend.pool_scores(x, pool, chunk_bytes)
    index = linear_assignment(dist if metric == "l2" else 1.0 - cos)
    noise = backend.pool_members(torch.empty_like(x), pool, index.tolist())
    return noise, index, dist, cos


# --------------------------------------------------------------------------- public API


def _check_common(latents, k, seed, mode, metric, sample_ids):
    checks.check_latents(latents)
    k = checks.check_k(k)
    checks.check_mode(mode)
    checks.check_metric(metric)
    seed = checks.check_seed(seed)
    if mode == "assign":
        checks.check_assign_size(latents.shape[0], k)
    ids = checks.check_sample_ids(sample_ids, latents.shape[0])
    return k, seed, list(range(latents.shape[0])) if ids is None else ids


def select_noise(latents: torch.Tensor, k: int, *, seed: int | None = None, mode: str = "knn",
                 metric: str = "l2", backend: str = "auto", return_info: bool = False,
                 chunk_bytes: int | None = None, sample_ids=None):
    """Gaussian noise paired with ``latents`` (shape ``[B, ...]``): nearest of ``k`` candidates.

    Parameters
    ----------
    latents : Tensor, shape (B, ...)
        Any float dtype, any device. Not modified.
    k : int
        Candidates per sample, in [1, 65536]. ``k == 1`` is plain Gaussian noise (knn) or the
        v1 batch permutation (assign).
    seed : int, optional
        In [0, 2**64). ``None`` draws one from torch's default generator, so ``torch.manual_seed``
        (a trainer's ``--seed``) governs the selection.
    mode : {"knn", "assign"}
    metric : {"l2", "cosine"}
        ``"l2"`` picks the nearest candidate, which also favours short noise vectors; ``"cosine"``
        picks the most aligned one and leaves the norm exactly Gaussian.
    backend : {"auto", "torch", "triton"}
        ``"auto"`` is the fused Triton kernel on CUDA when triton imports, else torch.
    return_info : bool
        Also return a :class:`SelectionInfo`.
    chunk_bytes : int, optional
        Size of one candidate buffer (default: at most 8 MiB and an eighth of one sample's
        candidates; at least one generator group). The result does not depend on it.
    sample_ids : sequence of int or 1-D int tensor, optional
        One id in [0, 2**32) per sample; a knn sample's candidates are keyed by its id, so the
        same (seed, id, latent) gives the same noise at any batch position or batch size.
        Default: the batch positions ``0..B-1``. The assign pool is shared and ignores them.

    Returns
    -------
    noise : Tensor, same shape, dtype and device as ``latents``
    info : SelectionInfo, only with ``return_info=True``
    """
    k, seed, ids = _check_common(latents, k, seed, mode, metric, sample_ids)
    resolved = resolve_backend(backend, latents.device)
    if seed is None:
        seed = draw_seed()
    x = latents.detach().reshape(latents.shape[0], -1).to(torch.float32).contiguous()
    try:
        noise, index, dist, cos = _select(BACKENDS[resolved](seed, ids), x, k, mode, metric, chunk_bytes, return_info)
    except Exception as exc:  # a kernel that fails at run time must never end a training run
        if resolved == "torch":
            raise
        _disabled[resolved] = f"{type(exc).__name__}: {exc}"
        logger.warning("immiscible: the %s backend failed (%s: %s); this process uses torch from now on "
                       "(immiscible.reset_fallback() tries it again)", resolved, type(exc).__name__, exc)
        resolved = "torch"
        noise, index, dist, cos = _select(BACKENDS[resolved](seed, ids), x, k, mode, metric, chunk_bytes, return_info)
    noise = noise.reshape(latents.shape).to(latents.dtype)
    if not return_info:
        return noise
    pick = index[:, None]
    return noise, SelectionInfo(index, dist.gather(1, pick)[:, 0], dist.mean(1), cos.gather(1, pick)[:, 0],
                                seed, k, mode, metric, resolved, dist, cos, ids)


def candidates(latents: torch.Tensor, k: int, *, seed: int, mode: str = "knn",
               backend: str = "auto", sample_ids=None) -> torch.Tensor:
    """The fp32 candidates that ``select_noise`` with the same arguments chooses from.

    Returns shape ``[B, k, ...]`` for knn and the flat pool ``[k * B, ...]`` for assign, which
    ``info.index`` indexes. Materializes them all: meant for tests, plots and inspection.
    """
    if seed is None:
        raise ValueError("candidates() needs an explicit seed (an integer in [0, 2**64))")
    k, seed, ids = _check_common(latents, k, seed, mode, "l2", sample_ids)
    backend = BACKENDS[resolve_backend(backend, latents.device)](seed, ids)
    batch, sample_shape = latents.shape[0], latents.shape[1:]
    count = k if mode == "knn" else k * batch
    out = backend.all_candidates(batch, latents[0].numel(), count, mode, latents.device)
    return out.reshape(batch, k, *sample_shape) if mode == "knn" else out.reshape(count, *sample_shape)
