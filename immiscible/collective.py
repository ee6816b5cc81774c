"""Selection over a ``torch.distributed`` process group: ``select_noise(..., group=...)``.

Every process of the group calls ``select_noise`` with its own latents and gets its own rows. The
global batch is every process's samples in rank order. With ``mode="assign"`` the result is exactly
what one process gets from ``select_noise`` on that concatenated batch with the same seed: the
same assignment and the same noise, because the assignment is solved by that very code.

Design: the latents (or, with ``coarse=N``, only their ``N x N`` pooling) are gathered to the
group's rank 0, which scores its pool of ``k x global batch`` candidates, solves the one
assignment and broadcasts each sample's pool member; every process then regenerates its winners
from the seed. Candidates never travel. (Scoring locally and gathering cost rows would spread the
scoring, but a matrix product's rounding can depend on how many rows it has, so its costs would
not be the single-process costs bit for bit; gathered latents are.)

Every process makes the same collectives in the same order, whatever happens to it locally:

1. ``all_gather`` of a header (batch size, latent shape and dtype, ``k``/mode/metric/coarse, its
   resolved backend, its seed, and whether its own checks passed). The seed used is rank 0's. A
   process whose own checks failed raises its error after this collective; every other process
   raises :class:`PeerSelectionError`, so all fall back for the batch together. knn stops here:
   each sample's candidates are keyed by its global index.
2. ``gather`` of the latents (padded bytes) to rank 0.
3. ``broadcast`` from rank 0 of each sample's pool member and statistics (and, with coarse, the
   pool's moments, from which a process gets its full-resolution statistics without the pool).
4. ``all_gather`` of each process's outcome (and its full-resolution statistics under coarse): a
   process that failed to regenerate its noise makes every process fall back.

Samples of different shapes (aspect buckets on different ranks) are assigned per shape: each
shape's samples, in global order, among themselves, to a pool of ``k x`` their count, exactly as
``select_noise`` on their concatenation. A collective that fails or times out raises
:class:`CollectiveError`: the group is unusable afterwards, so the caller must stop the run.
"""
from __future__ import annotations

import datetime
import math

import torch

from . import checks
from .backends import BACKENDS
from .coarse import pooling
from .scoring import distance_and_cosine
from .seeding import draw_seed
from .select import SelectionInfo, _check_common, _disabled, assigned, resolve_backend

#: Header fields (int64), then the latent's shape padded to ``MAX_DIMS``.
HEADER = ("ok", "batch", "ndim", "dtype", "k", "mode", "metric", "coarse", "backend", "seed_lo", "seed_hi")
MAX_DIMS = 8
BACKEND_NAMES = ("torch", "triton")
_F = {name: i for i, name in enumerate(HEADER)}


class CollectiveError(RuntimeError):
    """A collective of a selection over a process group failed or timed out; the group is unusable."""


class PeerSelectionError(RuntimeError):
    """Another process of the group could not select this batch, so no process selects it."""


# --------------------------------------------------------------------------- collectives


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group= needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group, or a launcher such as accelerate)")
    return dist


def comm_device(group, device: torch.device) -> torch.device:
    """Where the group's collectives take tensors: the CPU for gloo (and mpi), else a CUDA device."""
    name = str(_dist().get_backend(group))
    if "gloo" in name or "mpi" in name:
        return torch.device("cpu")
    return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


def run_collective(what: str, call, rank: int, timeout: float | None) -> None:
    """Start ``call()`` (an ``async_op=True`` collective) and wait for it; any failure or timeout is a
    :class:`CollectiveError` naming ``what`` and this rank."""
    try:
        work = call()
        done = work.wait() if timeout is None else work.wait(datetime.timedelta(seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - whatever the transport raises, the group is gone
        raise CollectiveError(f"the {what} collective of a selection over the process group failed on rank {rank} "
                              f"({type(exc).__name__}: {exc}); a failed collective leaves the group unusable") from exc
    if done is False:
        raise CollectiveError(f"the {what} collective of a selection over the process group timed out on rank {rank} "
                              f"after {timeout} s; the group is unusable")


def _all_gather(what, tensor, group, rank, world, timeout) -> list[torch.Tensor]:
    dist = _dist()
    out = [torch.empty_like(tensor) for _ in range(world)]
    run_collective(what, lambda: dist.all_gather(out, tensor, group=group, async_op=True), rank, timeout)
    return out


# --------------------------------------------------------------------------- the header


def _header(latents, k, seed, mode, metric, coarse, backend) -> list[int]:
    shape = tuple(latents.shape[1:])
    if len(shape) > MAX_DIMS:
        raise ValueError(f"group= takes latents of at most {MAX_DIMS} dimensions per sample, got shape {tuple(latents.shape)}")
    values = dict(ok=1, batch=latents.shape[0], ndim=len(shape), dtype=checks.LATENT_DTYPES.index(latents.dtype), k=k,
                  mode=checks.MODES.index(mode), metric=checks.METRICS.index(metric), coarse=coarse or 0,
                  backend=BACKEND_NAMES.index(backend), seed_lo=seed & 0xFFFFFFFF, seed_hi=seed >> 32)
    return [values[name] for name in HEADER] + list(shape) + [0] * (MAX_DIMS - len(shape))


def shape_of(header) -> tuple[int, ...]:
    return tuple(int(d) for d in header[len(HEADER): len(HEADER) + int(header[_F["ndim"]])])


def shape_groups(headers) -> dict[tuple, list[int]]:
    """Latent shape -> the ranks holding it, in rank order (shapes in order of first appearance)."""
    groups: dict[tuple, list[int]] = {}
    for r, h in enumerate(headers):
        groups.setdefault(shape_of(h), []).append(r)
    return groups


def _agreed(headers) -> None:
    """Every process must ask for the same selection (the same error on every rank: a joint stop)."""
    for name in ("k", "mode", "metric", "coarse"):
        values = sorted({int(h[_F[name]]) for h in headers})
        if len(values) > 1:
            raise ValueError(f"the processes of the group ask for different {name} values ({values}); every "
                             f"process must select with the same settings")


# --------------------------------------------------------------------------- the solve (rank 0)


def _rows_of(received, ranks, batches, width, dtype) -> torch.Tensor:
    """The gathered samples of ``ranks`` as ``[n, width]``: a view of ``received [W, bytes]`` when their
    rows hold nothing but those samples (equal batches, ranks in a row), else a copy."""
    nbytes = [batches[r] * width * dtype.itemsize for r in ranks]
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and all(n == received.shape[1] for n in nbytes):
        return received[ranks[0]: ranks[-1] + 1].reshape(-1).view(dtype).reshape(-1, width)
    return torch.cat([received[r][:n].view(dtype).reshape(batches[r], width) for r, n in zip(ranks, nbytes)])


def _solve(received, headers, k, metric, seed, backend, coarse, chunk_bytes, dtype, stats):
    """Rank 0: each shape's assignment into ``stats [4, total]`` (index and three statistics per
    global sample); returns the backend that ran and, with coarse, each shape's pool moments.
    ``received`` are on the latents' device, so the scores are those of a single process there."""
    batches = [int(h[_F["batch"]]) for h in headers]
    offsets = [sum(batches[:r]) for r in range(len(batches))]
    moments = []
    for shape, ranks in shape_groups(headers).items():
        numel = math.prod(shape)
        width = math.prod(shape[:-2]) * coarse * coarse if coarse else numel
        rows = _rows_of(received, ranks, batches, width, dtype).to(torch.float32)
        pool = k * rows.shape[0]
        try:
            scored, index, moment = _score(BACKENDS[backend], seed, rows, pool, numel, chunk_bytes, shape, coarse, metric)
        except Exception as exc:
            if backend == "torch":
                raise
            _disabled[backend] = f"{type(exc).__name__}: {exc}"
            backend = "torch"
            scored, index, moment = _score(BACKENDS[backend], seed, rows, pool, numel, chunk_bytes, shape, coarse, metric)
        moments.extend(moment)
        pick = index[:, None].to(scored.coarse_dist.device if coarse else scored.dist.device)
        dist, cos = (scored.coarse_dist, scored.coarse_cos) if coarse else (scored.dist, scored.cos)
        values = torch.stack([index.double().cpu(), dist.gather(1, pick)[:, 0].double().cpu(),
                              dist.mean(1).double().cpu(), cos.gather(1, pick)[:, 0].double().cpu()])
        at = torch.cat([torch.arange(offsets[r], offsets[r] + batches[r]) for r in ranks])
        stats[:, at] = values
    return backend, moments


def _score(cls, seed, rows, pool, numel, chunk_bytes, shape, coarse, metric):
    backend = cls(seed, list(range(rows.shape[0])))   # the pool is one shared "sample": ids do not enter it
    if coarse:
        scored, total, total_sq = backend.pooled_pool_scores(rows, pool, numel, chunk_bytes, pooling(shape, coarse))
        return scored, assigned(scored, metric), [total.cpu(), total_sq.reshape(1).cpu()]
    scored = backend.pool_scores(rows, pool, chunk_bytes, None)
    return scored, assigned(scored, metric), []


# --------------------------------------------------------------------------- the public entry


def abstain(group, *, timeout: float | None = None) -> None:
    """Take part in a group selection as a process that will not select this batch (its own check
    failed before it could call ``select_noise``): every other process's ``select_noise`` then
    raises :class:`PeerSelectionError` instead of waiting. Raises :class:`CollectiveError` like it."""
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    header = torch.zeros(len(HEADER) + MAX_DIMS, dtype=torch.int64, device=comm_device(group, torch.device("cpu")))
    _all_gather("header", header, group, rank, world, timeout)


def select_across(latents, k, group, *, seed=None, mode="knn", metric="l2", backend="auto", return_info=False,
                  chunk_bytes=None, coarse=None, timeout=None):
    """``select_noise(latents, ..., group=group)``: see :func:`immiscible.select_noise` and the module docs."""
    dist = _dist()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if timeout is not None:
        timeout = float(timeout)
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    error, header = None, [0] * (len(HEADER) + MAX_DIMS)
    try:
        k, seed, _ = _check_common(latents, k, seed, mode, metric, None)
        coarse = checks.check_coarse(coarse, latents.shape)
        checks.check_flag("return_info", return_info)
        if chunk_bytes is not None:
            chunk_bytes = checks.check_int("chunk_bytes", chunk_bytes, 1, 2**63 - 1, " (bytes of one candidate buffer)")
        resolved = resolve_backend(backend, latents.device)
        seed = draw_seed() if seed is None else seed
        header = _header(latents, k, seed, mode, metric, coarse, resolved)
    except Exception as exc:  # noqa: BLE001 - raised after the header, so that no process waits for this one
        error = exc
    device = latents.device if isinstance(latents, torch.Tensor) else torch.device("cpu")
    comm = comm_device(group, device)
    headers = [h.tolist() for h in _all_gather("header", torch.tensor(header, dtype=torch.int64, device=comm),
                                              group, rank, world, timeout)]
    if error is not None:
        raise error
    failed = [r for r, h in enumerate(headers) if not h[_F["ok"]]]
    if failed:
        raise PeerSelectionError(f"rank(s) {failed} of the group could not select this batch (their log says why), "
                                 f"so no rank selects it")
    _agreed(headers)
    seed = headers[0][_F["seed_lo"]] | (headers[0][_F["seed_hi"]] << 32)
    backends = {h[_F["backend"]] for h in headers}
    backend = BACKEND_NAMES[backends.pop()] if len(backends) == 1 else "torch"
    batches = [h[_F["batch"]] for h in headers]
    offset, batch, total = sum(batches[:rank]), latents.shape[0], sum(batches)
    rows = (offset, offset + batch)
    if mode == "knn":
        out = _local_select(latents, k, seed, "knn", metric, backend, return_info, chunk_bytes, list(range(*rows)), coarse)
        if return_info:
            out[1].scope, out[1].rows = "global", rows
        return out
    groups = shape_groups(headers)
    for shape, ranks in groups.items():
        checks.check_assign_size(sum(batches[r] for r in ranks), k)   # the same on every rank: a joint stop
    return _assign(latents, k, seed, metric, backend, return_info, chunk_bytes, coarse, group, rank, world, timeout,
                   headers, comm, rows, total)


def _local_select(latents, k, seed, mode, metric, backend, return_info, chunk_bytes, ids, coarse):
    from .select import select_noise

    return select_noise(latents, k, seed=seed, mode=mode, metric=metric, backend=backend, return_info=return_info,
                        chunk_bytes=chunk_bytes, sample_ids=ids, coarse=coarse)


def _payload_dtype(headers, coarse) -> torch.dtype:
    dtypes = {h[_F["dtype"]] for h in headers}
    return checks.LATENT_DTYPES[dtypes.pop()] if len(dtypes) == 1 and not coarse else torch.float32


def _assign(latents, k, seed, metric, backend, return_info, chunk_bytes, coarse, group, rank, world, timeout,
            headers, comm, rows, total):
    dist = _dist()
    root = dist.get_global_rank(group, 0) if group is not None else 0
    shape = tuple(latents.shape[1:])
    numel = math.prod(shape)
    x = latents.detach().reshape(latents.shape[0], -1)
    dtype = _payload_dtype(headers, coarse)
    # 2. the latents (pooled under coarse) to rank 0, as bytes (any dtype over any transport)
    payload = (pooling(shape, coarse)(x.to(torch.float32).contiguous()) if coarse else x.to(dtype)).contiguous()
    sizes = []
    for h in headers:
        s = shape_of(h)
        width = math.prod(s[:-2]) * coarse * coarse if coarse else math.prod(s)
        sizes.append(h[_F["batch"]] * width * dtype.itemsize)
    padded = torch.empty(max(sizes), dtype=torch.uint8, device=comm)   # a tail past sizes[rank] is never read
    padded[: sizes[rank]] = payload.reshape(-1).view(torch.uint8).to(comm)
    received = torch.empty(world, max(sizes), dtype=torch.uint8, device=comm) if rank == 0 else None
    rows_in = list(received.unbind(0)) if rank == 0 else None
    run_collective("latent gather", lambda: dist.gather(padded, rows_in, dst=root, group=group, async_op=True),
                   rank, timeout)
    # 3. rank 0 solves; everyone gets the indices and statistics
    groups = shape_groups(headers)
    moment_sizes = [math.prod(s) + 1 for s in groups] if coarse else []
    result = torch.zeros(2 + 4 * total + sum(moment_sizes), dtype=torch.float64)
    error = None
    if rank == 0:
        try:
            stats = torch.zeros(4, total, dtype=torch.float64)
            used, moments = _solve(received.to(latents.device), headers, k, metric, seed, backend, coarse, chunk_bytes,
                                   dtype, stats)
            result[0], result[1] = 1, BACKEND_NAMES.index(used)
            result[2: 2 + 4 * total] = stats.reshape(-1)
            if moments:
                result[2 + 4 * total:] = torch.cat([m.double() for m in moments])
        except Exception as exc:  # noqa: BLE001 - every rank falls back for this batch (step 3's flag)
            error, result[0] = exc, 0
    result = result.to(comm)
    run_collective("assignment broadcast", lambda: dist.broadcast(result, src=root, group=group, async_op=True),
                   rank, timeout)
    if error is not None:
        raise error
    result = result.cpu()
    if not result[0]:
        raise PeerSelectionError("rank 0 of the group could not solve this batch's assignment (its log says why), "
                                 "so no rank selects it")
    backend = BACKEND_NAMES[int(result[1])]
    stats = result[2: 2 + 4 * total].reshape(4, total)
    # 4. every rank regenerates its winners; outcomes (and full-resolution statistics under coarse) are shared
    error, mine = None, torch.zeros(4, max(h[_F["batch"]] for h in headers), dtype=torch.float64)
    try:
        ranks = groups[shape]
        group_size = sum(headers[r][_F["batch"]] for r in ranks)
        index = stats[0, rows[0]: rows[1]].long().tolist()
        cls = BACKENDS[backend](seed, list(range(group_size)))
        flat = cls.pool_members(torch.empty(len(index), numel, dtype=torch.float32, device=latents.device),
                                k * group_size, index)
        noise = flat.reshape(latents.shape).to(latents.dtype)
        mine[0, : len(index)] = 1
        if coarse:
            at = 2 + 4 * total + sum(moment_sizes[: list(groups).index(shape)])
            mine[1:, : len(index)] = _full_stats(x.to(torch.float32), flat, result[at: at + numel],
                                                 float(result[at + numel]), k * group_size)
    except Exception as exc:  # noqa: BLE001
        error, mine[0] = exc, 0
    outcomes = [o.cpu() for o in _all_gather("outcome", mine.to(comm), group, rank, world, timeout)]
    if error is not None:
        raise error
    failed = [r for r, o in enumerate(outcomes) if headers[r][_F["batch"]] and not o[0, 0]]
    if failed:
        raise PeerSelectionError(f"rank(s) {failed} of the group could not make their selected noise (their log says "
                                 f"why), so no rank selects this batch")
    if not return_info:
        return noise
    return noise, _global_info(stats, outcomes, headers, latents.device, seed, k, metric, backend, coarse, rows)


def _full_stats(x, noise, total, total_sq, pool) -> torch.Tensor:
    """``[3, B]`` full-resolution distance, mean distance over the pool and cosine, from the pool's moments."""
    x_sq = torch.linalg.vector_norm(x, dim=1).square()
    n_sq = torch.linalg.vector_norm(noise, dim=1).square()
    dist, cos = distance_and_cosine(x_sq, n_sq, (x * noise).sum(1))
    mean = (x_sq.double() + total_sq / pool - 2.0 * (x.double().cpu() @ (total / pool)).to(x.device)).clamp_min(0.0)
    return torch.stack([dist.double(), mean.double(), cos.double()]).cpu()


def _global_info(stats, outcomes, headers, device, seed, k, metric, backend, coarse, rows) -> SelectionInfo:
    as32 = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
    index = stats[0].long().to(device)
    if coarse:
        full = torch.cat([o[1:, : h[_F["batch"]]] for o, h in zip(outcomes, headers)], dim=1)
        info = SelectionInfo(index, as32(full[0]), as32(full[1]), as32(full[2]), seed, k, "assign", metric, backend,
                             sample_ids=list(range(index.numel())), coarse=coarse, scope="global", rows=rows)
        info.coarse_distance, info.coarse_mean_distance, info.coarse_cosine = as32(stats[1]), as32(stats[2]), as32(stats[3])
        return info
    return SelectionInfo(index, as32(stats[1]), as32(stats[2]), as32(stats[3]), seed, k, "assign", metric, backend,
                         sample_ids=list(range(index.numel())), scope="global", rows=rows)
