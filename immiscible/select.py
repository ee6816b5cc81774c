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

from . import _checks
from .assign import linear_assignment
from .scoring import distance_and_cosine, knn_distances, pool_distances
from .seeding import derive_seed, draw_seed
from .torch_rng import KNN_STREAM, POOL_STREAM, fill_candidates, group_size

logger = logging.getLogger(__name__)


@dataclass
class SelectionInfo:
    """What a selection chose, per sample (tensors on the latents' device).

    ``distance`` and ``mean_distance`` are squared L2 distances in fp32, whatever ``metric``
    chose by; ``cosine`` is between the chosen noise and the latent.
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


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA when triton imports, else ``"torch"``.

    An explicit ``"triton"`` that cannot run raises ``ValueError`` / ``ImportError`` at once.
    """
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_usable(device)[0] else "torch"
    if backend == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            raise (ImportError if "pip install" in why else ValueError)(why)
    return backend


class _TorchRNG:
    """Candidates from torch's generators (any device), scored in chunks."""

    def __init__(self, seed: int):
        self.seed = seed

    def fill(self, buf, runs, stream):
        return fill_candidates(buf, self.seed, runs, stream)

    def align(self, numel):
        return group_size(numel)

    def knn(self, x, k, chunk_bytes):
        fill = lambda buf, runs: self.fill(buf, runs, KNN_STREAM)  # noqa: E731
        return knn_distances(x, k, fill, chunk_bytes, self.align(x.shape[1]))


class _TritonRNG:
    """Candidates from the Philox kernels; knn is scored by the fused kernel without materializing."""

    def __init__(self, seed: int):
        self.seed = derive_seed(seed)  # 63 bits: a signed 64-bit kernel argument

    def align(self, numel):
        return 1

    def fill(self, buf, runs, stream):
        from .kernels.philox_knn import write_candidates

        sample, first, count = torch.tensor(runs, dtype=torch.int64).reshape(-1, 3).unbind(1)
        starts = torch.cumsum(count, 0) - count  # row of each run's first candidate
        sample, first, starts = (t.repeat_interleave(count) for t in (sample, first, starts))
        index = first + torch.arange(int(count.sum())) - starts
        return write_candidates(buf, self.seed, sample, index, stream)

    def knn(self, x, k, chunk_bytes):
        from .kernels.philox_knn import knn_partial_scores

        nn, xn = knn_partial_scores(x, k, self.seed)
        return distance_and_cosine(torch.linalg.vector_norm(x, dim=1).square()[:, None], nn, xn)


_RNGS = {"torch": _TorchRNG, "triton": _TritonRNG}
_warned_fallback = False


def _select(rng, x, k, mode, metric, chunk_bytes):
    batch = x.shape[0]
    if mode == "knn":
        dist, cos = rng.knn(x, k, chunk_bytes)
        index = torch.argmin(dist if metric == "l2" else -cos, dim=1)
        runs = [(b, j, 1) for b, j in enumerate(index.tolist())]
        stream = KNN_STREAM
    else:
        dist, cos = pool_distances(x, k * batch, lambda buf, r: rng.fill(buf, r, POOL_STREAM), chunk_bytes,
                                   rng.align(x.shape[1]))
        index = linear_assignment(dist if metric == "l2" else 1.0 - cos)
        runs = [(0, p, 1) for p in index.tolist()]
        stream = POOL_STREAM
    noise = rng.fill(torch.empty_like(x), runs, stream)
    pick = index[:, None]
    return noise, index, dist.gather(1, pick)[:, 0], dist.mean(1), cos.gather(1, pick)[:, 0]


# --------------------------------------------------------------------------- public API


def _check_common(latents, k, seed, mode, metric):
    _checks.check_latents(latents)
    k = _checks.check_k(k)
    _checks.check_choice("mode", mode, _checks.MODES)
    _checks.check_choice("metric", metric, _checks.METRICS)
    seed = _checks.check_seed(seed)
    if mode == "assign":
        _checks.check_assign_size(latents.shape[0], k)
    return k, seed


def select_noise(latents: torch.Tensor, k: int, *, seed: int | None = None, mode: str = "knn",
                 metric: str = "l2", backend: str = "auto", return_info: bool = False,
                 chunk_bytes: int | None = None):
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
        Size of one candidate buffer (default: at most 8 MiB and an eighth of one sample's candidates). The result does not depend on it.

    Returns
    -------
    noise : Tensor, same shape, dtype and device as ``latents``
    info : SelectionInfo, only with ``return_info=True``
    """
    k, seed = _check_common(latents, k, seed, mode, metric)
    resolved = resolve_backend(backend, latents.device)
    if seed is None:
        seed = draw_seed()
    x = latents.detach().reshape(latents.shape[0], -1).to(torch.float32).contiguous()
    try:
        noise, index, dist, mean_dist, cos = _select(_RNGS[resolved](seed), x, k, mode, metric, chunk_bytes)
    except Exception as exc:  # a kernel that fails at run time must never end a training run
        if resolved == "torch":
            raise
        global _warned_fallback
        if not _warned_fallback:
            logger.warning("immiscible: the %s backend failed (%s: %s); falling back to torch from now on",
                           resolved, type(exc).__name__, exc)
            _warned_fallback = True
        resolved = "torch"
        noise, index, dist, mean_dist, cos = _select(_RNGS[resolved](seed), x, k, mode, metric, chunk_bytes)
    noise = noise.reshape(latents.shape).to(latents.dtype)
    if not return_info:
        return noise
    return noise, SelectionInfo(index, dist, mean_dist, cos, seed, k, mode, metric, resolved)


def candidates(latents: torch.Tensor, k: int, *, seed: int, mode: str = "knn",
               backend: str = "auto") -> torch.Tensor:
    """The fp32 candidates that ``select_noise`` with the same arguments chooses from.

    Returns shape ``[B, k, ...]`` for knn and the flat pool ``[k * B, ...]`` for assign, which
    ``info.index`` indexes. Materializes them all: meant for tests, plots and inspection.
    """
    if seed is None:
        raise ValueError("candidates() needs an explicit seed (an integer in [0, 2**64))")
    k, seed = _check_common(latents, k, seed, mode, "l2")
    rng = _RNGS[resolve_backend(backend, latents.device)](seed)
    batch, sample_shape = latents.shape[0], latents.shape[1:]
    numel = latents[0].numel()
    if mode == "knn":
        runs = [(b, 0, k) for b in range(batch)]
        out = rng.fill(torch.empty(batch * k, numel, device=latents.device), runs, KNN_STREAM)
        return out.reshape(batch, k, *sample_shape)
    out = rng.fill(torch.empty(k * batch, numel, device=latents.device), [(0, 0, k * batch)], POOL_STREAM)
    return out.reshape(k * batch, *sample_shape)
