"""Fused KNN noise selection in Triton: generate, score, arg-min, regenerate the winner.

Layout follows Triton's tutorials: kernels, then launchers. Each launcher runs what its
``*_launch`` function works out (grid, arguments, constexprs; ``OPTIONS``), which the kernel report
(``immiscible_lab/kernel_report``) also binds and compiles for every GPU generation. The reference
is ``philox_ref.py`` beside this file, the tests are ``tests/test_triton_kernel.py`` and
``tests/test_aot.py``, and the benchmark is ``immiscible_lab/bench.py``.

Candidate noise is a pure function of ``(seed, sample id, index, stream, element)``: Philox4x32-10
with counter ``(element // 4, index, sample, stream)`` gives four uniforms, Box-Muller turns them
into four normals (Triton's radius; the angle's sine and cosine by an exact quarter-turn
reduction and polynomials, without libdevice's branches). So the scoring kernel never writes a
candidate: it keeps two fp32 partial sums per candidate (``|n|^2`` and ``x.n``), and the winner is
regenerated afterwards. Extra memory is ``2 * B * k * splits`` floats plus the ``B * D`` output,
whatever ``k`` is.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

from .philox_ref import COS_COEFFS, ROUND, SIN_COEFFS

BLOCK_J = 4      # candidates per program: the latent tile is read once for all of them
BLOCK_M = 256    # Philox blocks per step: 4 * BLOCK_M = 1024 elements
TARGET_PROGRAMS = 1024
X_DTYPES = (torch.float32,)      # what the launchers pass; the kernel report compiles each
OUT_DTYPES = (torch.float32,)

# Specialization: every access is a strided scalar load or store and every integer only feeds
# masks and index arithmetic, so Triton's specializations (pointer alignment, divisibility by 16,
# value 1) buy nothing here; each would cost a fresh JIT compile per shape class on the user's GPU
# and six more ahead-of-time compiles in CI. Sizes are int64 because a sample may hold up to 2**33
# elements. One variant per kernel and dtype results (tests/test_aot.py holds it to that).
# FP fusion is set, not left to Triton's default (which 3.10 turns off): candidates depend on it.
OPTIONS = {"num_warps": 4, "enable_fp_fusion": True}
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2


# The angle's polynomials and rounding constant are the reference's (philox_ref.sincos_2pi).
_S1, _S3, _S5, _S7, _S9 = (tl.constexpr(v) for v in SIN_COEFFS)
_C2, _C4, _C6, _C8 = (tl.constexpr(v) for v in COS_COEFFS[1:])
_ROUND = tl.constexpr(ROUND)


@triton.jit
def _sincos_2pi(u):
    """``sin(2 pi u), cos(2 pi u)`` for u in [0, 1): an exact quarter-turn reduction, then polynomials.

    No libdevice call: no slow path for huge arguments (they cannot occur) and no branches.
    """
    t = 4.0 * u                        # the angle in quarter turns, exact
    tq = t + _ROUND
    f = t - (tq - _ROUND)              # t minus the nearest integer q: in [-1/2, 1/2], exact
    ff = f * f
    s = f * (_S1 + ff * (_S3 + ff * (_S5 + ff * (_S7 + ff * _S9))))
    c = 1.0 + ff * (_C2 + ff * (_C4 + ff * (_C6 + ff * _C8)))
    q = tq.to(tl.int32, bitcast=True)  # q mod 4 is in the two lowest bits
    odd = (q & 1) != 0
    sin = tl.where(odd, c, s)
    cos = tl.where(odd, s, c)
    sin = tl.where((q & 2) != 0, -sin, sin)
    cos = tl.where(((q + 1) & 2) != 0, -cos, cos)
    return sin, cos


@triton.jit
def _box_muller(u1, u2):
    """Two N(0,1) from two uniforms: the radius as Triton's ``pair_uniform_to_normal`` (u1 clamped at 1e-7)."""
    r = tl.sqrt(-2.0 * tl.log(tl.maximum(1.0e-7, u1)))
    sin, cos = _sincos_2pi(u2)
    return r * cos, r * sin


@triton.jit
def _normals4(seed, m, j, s, stream):
    """Four N(0,1) tiles for counters ``(m, j, s, stream)`` (uint32 tiles of one shape)."""
    r0, r1, r2, r3 = philox(seed, m, j, s, stream)
    n0, n1 = _box_muller(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
    n2, n3 = _box_muller(uint_to_uniform_float(r2), uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def _accumulate(acc_nn, acc_xn, n, x_ptr, d, valid):
    x = tl.load(x_ptr + d, mask=valid, other=0.0).to(tl.float32)
    n = tl.where(valid[None, :], n, 0.0)
    return acc_nn + n * n, acc_xn + n * x[None, :]


@triton.jit(do_not_specialize=["seed", "D", "D4", "K", "SPLIT_M", "n_splits", "stride_xb"],
            do_not_specialize_on_alignment=["x_ptr", "ids_ptr", "nn_ptr", "xn_ptr"])
def knn_partial_scores_kernel(x_ptr, ids_ptr, nn_ptr, xn_ptr, seed: tl.int64, D: tl.int64, D4: tl.int64, K,
                              SPLIT_M: tl.int64, n_splits, stride_xb: tl.int64,
                              BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr):
    """Partial ``|n|^2`` and ``x.n`` of candidates ``j`` of row ``b`` (sample id ``ids[b]``) over one split of D."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    split = tl.program_id(2)
    m_begin = split * SPLIT_M
    m_end = tl.minimum(m_begin + SPLIT_M, D4)
    zero = tl.zeros([BLOCK_J, BLOCK_M], dtype=tl.uint32)
    jj = j.to(tl.uint32)[:, None] + zero
    ss = zero + tl.load(ids_ptr + b).to(tl.uint32)
    acc_nn = tl.zeros([BLOCK_J, BLOCK_M], dtype=tl.float32)
    acc_xn = tl.zeros([BLOCK_J, BLOCK_M], dtype=tl.float32)
    x_row = x_ptr + b.to(tl.int64) * stride_xb
    offs = tl.arange(0, BLOCK_M)
    d = 4 * offs
    for m0 in range(m_begin, m_end, BLOCK_M):
        # 64-bit arithmetic stays scalar; the tile works in 32 bits relative to m0
        in_split = offs < tl.minimum(m_end - m0, BLOCK_M).to(tl.int32)
        left = tl.minimum(D - 4 * m0, 4 * BLOCK_M).to(tl.int32)  # elements of the row from 4 * m0 on
        m = tl.cast(m0, tl.uint32) + offs.to(tl.uint32)
        n0, n1, n2, n3 = _normals4(seed, m[None, :] + zero, jj, ss, zero)
        x_tile = x_row + 4 * m0
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n0, x_tile, d, in_split & (d < left))
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n1, x_tile, d + 1, in_split & (d + 1 < left))
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n2, x_tile, d + 2, in_split & (d + 2 < left))
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n3, x_tile, d + 3, in_split & (d + 3 < left))
    out = (b.to(tl.int64) * K + j) * n_splits + split
    tl.store(nn_ptr + out, tl.sum(acc_nn, axis=1), mask=j < K)
    tl.store(xn_ptr + out, tl.sum(acc_xn, axis=1), mask=j < K)


@triton.jit(do_not_specialize=["seed", "stream", "D", "D4", "stride_or"],
            do_not_specialize_on_alignment=["out_ptr", "sample_ptr", "index_ptr"])
def write_candidates_kernel(out_ptr, sample_ptr, index_ptr, seed: tl.int64, stream, D: tl.int64, D4: tl.int64,
                            stride_or: tl.int64, BLOCK_M: tl.constexpr):
    """Row ``r`` of ``out`` := candidate ``(sample[r], index[r])`` of ``stream``."""
    r = tl.program_id(0)
    zero = tl.zeros([BLOCK_M], dtype=tl.uint32)
    s = tl.load(sample_ptr + r).to(tl.uint32) + zero
    j = tl.load(index_ptr + r).to(tl.uint32) + zero
    row = out_ptr + r.to(tl.int64) * stride_or
    offs = tl.arange(0, BLOCK_M)
    d = 4 * offs
    for m0 in range(tl.program_id(1).to(tl.int64) * BLOCK_M, D4, tl.num_programs(1) * BLOCK_M):  # grid-stride
        n0, n1, n2, n3 = _normals4(seed, tl.cast(m0, tl.uint32) + offs.to(tl.uint32), j, s, zero + stream.to(tl.uint32))
        tile = row + 4 * m0
        left = tl.minimum(D - 4 * m0, 4 * BLOCK_M).to(tl.int32)  # elements of the row from 4 * m0 on
        tl.store(tile + d, n0, mask=d < left)
        tl.store(tile + d + 1, n1, mask=d + 1 < left)
        tl.store(tile + d + 2, n2, mask=d + 2 < left)
        tl.store(tile + d + 3, n3, mask=d + 3 < left)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple) -> None:
    assert t.dtype in allowed, f"{name} must be one of {allowed} (the AOT-compiled variants), got {t.dtype}"


def knn_partial_scores_launch(x: torch.Tensor, k: int, seed: int, sample_ids: torch.Tensor | None = None, *,
                              split_d: bool | None = None):
    """``(grid, args, constexprs, (nn, xn))`` of :func:`knn_partial_scores`'s launch; ``nn`` and ``xn``
    are ``[B, k, splits]``, allocated, not yet filled.

    ``split_d`` spreads D over several programs when ``B * ceil(k / BLOCK_J)`` is small; by default
    it does so on a GPU and not under the interpreter (where each program is slow to run).
    """
    _check_dtype("x", x, X_DTYPES)
    batch, numel = x.shape
    d4 = triton.cdiv(numel, 4)
    blocks_m = triton.cdiv(d4, BLOCK_M)
    programs = batch * triton.cdiv(k, BLOCK_J)
    split_d = not _interpreting() if split_d is None else split_d
    splits = max(1, min(blocks_m, triton.cdiv(TARGET_PROGRAMS, programs))) if split_d else 1
    split_m = triton.cdiv(blocks_m, splits) * BLOCK_M
    splits = triton.cdiv(d4, split_m)
    if sample_ids is None:
        sample_ids = torch.arange(batch, device=x.device)
    sample_ids = sample_ids.to(x.device, torch.int64).contiguous()
    nn = torch.empty(batch, k, splits, dtype=torch.float32, device=x.device)
    xn = torch.empty_like(nn)
    return ((batch, triton.cdiv(k, BLOCK_J), splits),
            (x, sample_ids, nn, xn, seed, numel, d4, k, split_m, splits, x.stride(0)),
            {"BLOCK_J": BLOCK_J, "BLOCK_M": BLOCK_M}, (nn, xn))


def knn_partial_scores(x: torch.Tensor, k: int, seed: int, sample_ids: torch.Tensor | None = None, *,
                       split_d: bool | None = None):
    """``(|n|^2, x.n)`` as fp32 ``[B, k]`` for every candidate of every sample, never materialized.

    Row ``b``'s candidates are those of sample id ``sample_ids[b]`` (default: ``b``).
    """
    grid, args, constexprs, (nn, xn) = knn_partial_scores_launch(x, k, seed, sample_ids, split_d=split_d)
    knn_partial_scores_kernel[grid](*args, **constexprs, **OPTIONS)
    return nn.sum(-1), xn.sum(-1)


def write_candidates_launch(out: torch.Tensor, seed: int, sample: torch.Tensor, index: torch.Tensor, stream: int):
    """``(grid, args, constexprs, (out,))`` of :func:`write_candidates`'s launch (``out`` has at least one row)."""
    _check_dtype("out", out, OUT_DTYPES)
    rows, numel = out.shape
    d4 = triton.cdiv(numel, 4)
    sample = sample.to(out.device, torch.int64).contiguous()
    index = index.to(out.device, torch.int64).contiguous()
    return ((rows, min(triton.cdiv(d4, BLOCK_M), MAX_GRID_YZ), 1),
            (out, sample, index, seed, stream, numel, d4, out.stride(0)), {"BLOCK_M": BLOCK_M}, (out,))


def write_candidates(out: torch.Tensor, seed: int, sample: torch.Tensor, index: torch.Tensor,
                     stream: int) -> torch.Tensor:
    """Fill fp32 ``out[r]`` ([R, D], rows contiguous) with candidate ``(sample[r], index[r])``."""
    if out.shape[0] == 0:
        return out
    grid, args, constexprs, _ = write_candidates_launch(out, seed, sample, index, stream)
    write_candidates_kernel[grid](*args, **constexprs, **OPTIONS)
    return out
