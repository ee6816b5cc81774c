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
from .coarse import pooling
from .seeding import draw_seed

logger = logging.getLogger(__name__)

CHUNK_BYTES_MAX = 2**63 - 1


@dataclass
class SelectionInfo:
    """What a selection chose, per sample (tensors on the latents' device).

    Distances are squared L2 in fp32, whatever ``metric`` chose by; cosines are between a
    candidate and the latent. ``distances`` and ``cosines`` hold every candidate's score
    (``[B, k]`` for knn, ``[B, k * B]`` against the whole pool for assign), so callers that show
    statistics never recompute them.

    With ``group=`` (``scope == "global"``) and assign, the per-sample fields describe the whole global
    batch (every process's samples in rank order; ``rows`` are this process's), ``index`` is a pool
    member of the sample's shape's pool, and ``distances``/``cosines`` are None (they stay where they
    were solved). With knn they describe this process's samples, keyed by their global index.

    With ``coarse=N`` the ``coarse_*`` fields hold the same statistics in the pooled space the
    candidates were ranked in (latent and candidates average-pooled to ``N x N``); they are None
    without it.
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
    coarse: int | None = None                      # N of N x N pooling, or None (off)
    coarse_distance: torch.Tensor | None = None      # [B] pooled squared distance to the chosen noise
    coarse_mean_distance: torch.Tensor | None = None  # [B] its mean over the sample's candidates
    coarse_cosine: torch.Tensor | None = None        # [B] cosine(pooled chosen noise, pooled latent)
    coarse_distances: torch.Tensor | None = None     # [B, C] pooled squared distance to every candidate
    coarse_cosines: torch.Tensor | None = None       # [B, C] pooled cosine to every candidate
    scope: str = "rank"                  # "global": selected over a process group (``group=``)
    rows: tuple[int, int] | None = None  # global: this process's samples, rows [start, stop) of the global batch

    @property
    def reduction_per_sample(self) -> torch.Tensor:
        return 1.0 - self.distance / self.mean_distance.clamp_min(1e-30)

    @property
    def reduction(self) -> float:
        """``1 - distance / mean_distance``, averaged over the batch."""
        return float(self.reduction_per_sample.mean())

    @property
    def coarse_reduction_per_sample(self) -> torch.Tensor | None:
        if self.coarse_distance is None:
            return None
        return 1.0 - self.coarse_distance / self.coarse_mean_distance.clamp_min(1e-30)

    @property
    def coarse_reduction(self) -> float | None:
        """The pooled-space ``1 - distance / mean_distance``, averaged over the batch (None without coarse)."""
        per_sample = self.coarse_reduction_per_sample
        return None if per_sample is None else float(per_sample.mean())


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
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        exc = ValueError if isinstance(device, str) else TypeError
        raise exc(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}") from None
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and _triton_usable(device)[0] else "torch"
    elif backend == "triton":
        ok, why = _triton_usable(device)
        if not ok:
            raise (ImportError if "pip install" in why else ValueError)(why)
    return "torch" if backend in _disabled else backend


def _select(backend, x, k, mode, metric, chunk_bytes, with_cosines=True, project=None):
    """A ``scoring.Scored`` for fp32 ``x [B, D]`` (knn cosines only when asked or needed)."""
    if mode == "knn":
        return backend.knn(x, k, metric, chunk_bytes, with_cosines, project)
    pool = k * x.shape[0]
    scored = backend.pool_scores(x, pool, chunk_bytes, project)
    index = assigned(scored, metric)
    noise = backend.pool_members(torch.empty_like(x), pool, index.tolist())
    return scored._replace(noise=noise, index=index)


def assigned(scored, metric: str) -> torch.Tensor:
    """The pool member each row of a ``Scored`` pool gets: one linear assignment of its ranking."""
    return linear_assignment(scored.ranking(metric) + (1.0 if metric == "cosine" else 0.0))


def _info(scored, seed, k, mode, metric, backend, ids, coarse) -> SelectionInfo:
    pick = scored.index[:, None]
    chosen = lambda scores: scores.gather(1, pick)[:, 0]  # noqa: E731
    info = SelectionInfo(scored.index, chosen(scored.dist), scored.dist.mean(1), chosen(scored.cos), seed, k, mode,
                         metric, backend, scored.dist, scored.cos, ids)
    if coarse is not None:
        info.coarse, info.coarse_distances, info.coarse_cosines = coarse, scored.coarse_dist, scored.coarse_cos
        info.coarse_distance, info.coarse_cosine = chosen(scored.coarse_dist), chosen(scored.coarse_cos)
        info.coarse_mean_distance = scored.coarse_dist.mean(1)
    return info


# --------------------------------------------------------------------------- public API


def _check_common(latents, k, seed, mode, metric, sample_ids):
    checks.check_latents(latents)  # first: the other checks read its shape
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
                 chunk_bytes: int | None = None, sample_ids=None, coarse: int | None = None, group=None,
                 timeout: float | None = None):
    """Gaussian noise paired with ``latents`` (shape ``[B, ...]``): nearest of ``k`` candidates.

    Parameters
    ----------
    latents : Tensor, shape (B, ...)
        Dense (any strides, ``channels_last`` included), on any device with values, of a dtype in
        ``LATENT_DTYPES`` (float16, bfloat16, float32, float64), finite, every ``|value|`` at most
        ``LATENT_ABS_MAX`` (2**47), each sample all zeros or with a ``|value|`` of at least
        ``LATENT_ABS_MIN`` (2**-63). Anything else raises ``TypeError``/``ValueError`` naming
        ``latents``. Not modified.
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
        Size of one candidate buffer in bytes, at least 1 (default: at most 8 MiB and an eighth of
        one sample's candidates; at least one generator group). The result does not depend on it.
    sample_ids : sequence of int or 1-D int tensor, optional
        One id in [0, 2**32) per sample; a knn sample's candidates are keyed by its id, so the
        same (seed, id, latent) gives the same noise at any batch position or batch size.
        Default: the batch positions ``0..B-1``. The assign pool is shared and ignores them.
    coarse : int, optional
        Coarse selection: rank candidates by ``metric`` after latent and candidates are
        average-pooled to ``coarse x coarse`` over the last two (spatial) dimensions
        (``adaptive_avg_pool2d`` semantics, so H and W need not divide by it), and return the
        full-resolution candidate. Needs latents ``[B, ..., H, W]`` and ``1 <= coarse <= min(H, W)``;
        ``None`` or 0 is off. The candidates are the same as without it.
    group : torch.distributed.ProcessGroup, optional
        Select over the processes of ``group`` (``torch.distributed.group.WORLD`` for all): every
        process calls ``select_noise`` with its own latents (batch sizes and shapes may differ) and
        gets its own rows of the result. The seed is rank 0's. With assign, the result is exactly
        ``select_noise(concatenation of every process's latents in rank order, ...)``'s rows for
        this process (samples of each latent shape are assigned among themselves); with knn, each
        sample is keyed by its global index (``sample_ids`` must then be None). Raises
        ``immiscible.CollectiveError`` when a collective fails (the group is then unusable), and
        ``immiscible.PeerSelectionError`` on every process when another one could not select
        (see :mod:`immiscible.collective`). None: this process alone.
    timeout : float, optional
        With ``group``: seconds each collective may wait (None: the group's own timeout).

    Returns
    -------
    noise : Tensor, same shape, dtype and device as ``latents``
    info : SelectionInfo, only with ``return_info=True``
    """
    if group is not None:
        from .collective import select_across

        if sample_ids is not None:
            raise ValueError("sample_ids must be None with group=: samples are keyed by their global index")
        return select_across(latents, k, group, seed=seed, mode=mode, metric=metric, backend=backend,
                             return_info=return_info, chunk_bytes=chunk_bytes, coarse=coarse, timeout=timeout)
    k, seed, ids = _check_common(latents, k, seed, mode, metric, sample_ids)
    coarse = checks.check_coarse(coarse, latents.shape)
    checks.check_flag("return_info", return_info)
    if chunk_bytes is not None:
        chunk_bytes = checks.check_int("chunk_bytes", chunk_bytes, 1, CHUNK_BYTES_MAX, " (bytes of one candidate buffer)")
    project = pooling(latents.shape[1:], coarse)
    resolved = resolve_backend(backend, latents.device)
    if seed is None:
        seed = draw_seed()
    x = latents.detach().reshape(latents.shape[0], -1).to(torch.float32).contiguous()
    run = lambda name: _select(BACKENDS[name](seed, ids), x, k, mode, metric, chunk_bytes, return_info, project)  # noqa: E731
    try:
        scored = run(resolved)
    except Exception as exc:  # a kernel that fails at run time must never end a training run
        if resolved == "torch":
            raise
        _disabled[resolved] = f"{type(exc).__name__}: {exc}"
        logger.warning("immiscible: the %s backend failed (%s: %s); this process uses torch from now on "
                       "(immiscible.reset_fallback() tries it again)", resolved, type(exc).__name__, exc)
        resolved = "torch"
        scored = run(resolved)
    noise = scored.noise.reshape(latents.shape).to(latents.dtype)
    if not return_info:
        return noise
    return noise, _info(scored, seed, k, mode, metric, resolved, ids, coarse)


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
