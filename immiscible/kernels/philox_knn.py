"""Fused KNN noise selection in Triton: generate, score, arg-min, regenerate the winner.

Layout follows Triton's tutorials: kernels, then launchers. The reference is
``philox_ref.py`` beside this file, the test is ``tests/test_triton_kernel.py`` and the benchmark
is ``immiscible_lab/bench.py``.

Candidate noise is a pure function of ``(seed, sample id, index, stream, element)``: Philox4x32-10
with counter ``(element // 4, index, sample, stream)`` gives four uniforms, Box-Muller turns them
into four normals. So the scoring kernel never writes a candidate: it keeps two fp32 partial sums
per candidate (``|n|^2`` and ``x.n``), and the winner is regenerated afterwards. Extra memory is
``2 * B * k * splits`` floats plus the ``B * D`` output, whatever ``k`` is.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, philox, uint_to_uniform_float

BLOCK_J = 4      # candidates per program: the latent tile is read once for all of them
BLOCK_M = 256    # Philox blocks per step: 4 * BLOCK_M = 1024 elements
TARGET_PROGRAMS = 1024


@triton.jit
def _normals4(seed, m, j, s, stream):
    """Four N(0,1) tiles for counters ``(m, j, s, stream)`` (uint32 tiles of one shape)."""
    r0, r1, r2, r3 = philox(seed, m, j, s, stream)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(r2), uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def _accumulate(acc_nn, acc_xn, n, x_ptr, d, valid):
    x = tl.load(x_ptr + d, mask=valid, other=0.0).to(tl.float32)
    n = tl.where(valid[None, :], n, 0.0)
    return acc_nn + n * n, acc_xn + n * x[None, :]


@triton.jit(do_not_specialize=["seed"])
def knn_partial_scores_kernel(x_ptr, ids_ptr, nn_ptr, xn_ptr, seed, D, D4, K, SPLIT_M, n_splits, stride_xb,
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
    for m0 in range(m_begin, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        in_split = m < m_end
        n0, n1, n2, n3 = _normals4(seed, m.to(tl.uint32)[None, :] + zero, jj, ss, zero)
        d = 4 * m.to(tl.int64)
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n0, x_row, d, in_split & (d < D))
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n1, x_row, d + 1, in_split & (d + 1 < D))
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n2, x_row, d + 2, in_split & (d + 2 < D))
        acc_nn, acc_xn = _accumulate(acc_nn, acc_xn, n3, x_row, d + 3, in_split & (d + 3 < D))
    out = (b.to(tl.int64) * K + j) * n_splits + split
    tl.store(nn_ptr + out, tl.sum(acc_nn, axis=1), mask=j < K)
    tl.store(xn_ptr + out, tl.sum(acc_xn, axis=1), mask=j < K)


@triton.jit(do_not_specialize=["seed"])
def write_candidates_kernel(out_ptr, sample_ptr, index_ptr, seed, stream, D, D4, stride_or,
                            BLOCK_M: tl.constexpr):
    """Row ``r`` of ``out`` := candidate ``(sample[r], index[r])`` of ``stream``."""
    r = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    zero = tl.zeros([BLOCK_M], dtype=tl.uint32)
    s = tl.load(sample_ptr + r).to(tl.uint32) + zero
    j = tl.load(index_ptr + r).to(tl.uint32) + zero
    n0, n1, n2, n3 = _normals4(seed, m.to(tl.uint32), j, s, zero + stream.to(tl.uint32))
    row = out_ptr + r.to(tl.int64) * stride_or
    d = 4 * m.to(tl.int64)
    tl.store(row + d, n0, mask=d < D)
    tl.store(row + d + 1, n1, mask=d + 1 < D)
    tl.store(row + d + 2, n2, mask=d + 2 < D)
    tl.store(row + d + 3, n3, mask=d + 3 < D)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def knn_partial_scores(x: torch.Tensor, k: int, seed: int, sample_ids: torch.Tensor | None = None):
    """``(|n|^2, x.n)`` as fp32 ``[B, k]`` for every candidate of every sample, never materialized.

    Row ``b``'s candidates are those of sample id ``sample_ids[b]`` (default: ``b``).
    """
    batch, numel = x.shape
    d4 = triton.cdiv(numel, 4)
    blocks_m = triton.cdiv(d4, BLOCK_M)
    programs = batch * triton.cdiv(k, BLOCK_J)
    splits = 1 if _interpreting() else max(1, min(blocks_m, triton.cdiv(TARGET_PROGRAMS, programs)))
    split_m = triton.cdiv(blocks_m, splits) * BLOCK_M
    splits = triton.cdiv(d4, split_m)
    if sample_ids is None:
        sample_ids = torch.arange(batch, device=x.device)
    sample_ids = sample_ids.to(x.device, torch.int64).contiguous()
    nn = torch.empty(batch, k, splits, dtype=torch.float32, device=x.device)
    xn = torch.empty_like(nn)
    grid = (batch, triton.cdiv(k, BLOCK_J), splits)
    knn_partial_scores_kernel[grid](x, sample_ids, nn, xn, seed, numel, d4, k, split_m, splits, x.stride(0),
                                    BLOCK_J=BLOCK_J, BLOCK_M=BLOCK_M)
    return nn.sum(-1), xn.sum(-1)


def write_candidates(out: torch.Tensor, seed: int, sample: torch.Tensor, index: torch.Tensor,
                     stream: int) -> torch.Tensor:
    """Fill fp32 ``out[r]`` ([R, D], rows contiguous) with candidate ``(sample[r], index[r])``."""
    rows, numel = out.shape
    if rows == 0:
        return out
    d4 = triton.cdiv(numel, 4)
    grid = (rows, triton.cdiv(d4, BLOCK_M))
    sample = sample.to(out.device, torch.int64).contiguous()
    index = index.to(out.device, torch.int64).contiguous()
    write_candidates_kernel[grid](out, sample, index,
                                  seed, stream, numel, d4, out.stride(0), BLOCK_M=BLOCK_M)
    return out
