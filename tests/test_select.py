"""Exactness, determinism and input checks of immiscible.select_noise / candidates."""
import logging

import pytest
import torch
from scipy.optimize import linear_sum_assignment

import immiscible
from immiscible import select as select_mod
from helpers import fp64_distances_knn, fp64_distances_pool

BACKENDS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on the CPU (see conftest)
SHAPES = [(3, 4, 8, 8), (2, 4, 3, 6, 6), (2, 3, 5, 7)]  # 4-D, 5-D video, D not a multiple of 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _latents(shape, dtype, seed=0, backend="torch"):
    """Latents on the backend's device: CUDA for triton when there is a GPU, else the interpreter's CPU."""
    g = torch.Generator().manual_seed(seed)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    return (torch.randn(shape, generator=g) * 1.3 + 0.2).to(dtype).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_picks_the_fp64_argmin(backend, shape, dtype):
    latents = _latents(shape, dtype, backend=backend)
    noise, info = immiscible.select_noise(latents, 7, seed=11, backend=backend, return_info=True)
    cands = immiscible.candidates(latents, 7, seed=11, backend=backend)
    assert cands.shape == (shape[0], 7, *shape[1:]) and cands.dtype == torch.float32
    dist = fp64_distances_knn(latents, cands)
    assert torch.equal(info.index, dist.argmin(1))
    chosen = cands[torch.arange(shape[0], device=cands.device), info.index]
    assert noise.shape == latents.shape and noise.dtype == dtype
    assert torch.equal(noise, chosen.to(dtype))
    picked = dist.gather(1, info.index[:, None])[:, 0]
    torch.testing.assert_close(info.distance.double(), picked, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(info.mean_distance.double(), dist.mean(1), rtol=1e-4, atol=1e-3)
    assert info.backend == backend
    assert 0.0 < info.reduction < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
def test_assign_matches_scipy(backend, shape, dtype, k):
    latents = _latents(shape, dtype, seed=1, backend=backend)
    noise, info = immiscible.select_noise(latents, k, seed=5, mode="assign", backend=backend, return_info=True)
    pool = immiscible.candidates(latents, k, seed=5, mode="assign", backend=backend)
    assert pool.shape == (k * shape[0], *shape[1:])
    cost = fp64_distances_pool(latents, pool)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    assert info.index.unique().numel() == shape[0], "pairing must use distinct pool members"
    assert torch.equal(info.index.cpu()[torch.from_numpy(rows)], torch.from_numpy(cols).long())
    assert torch.equal(noise, pool[info.index].to(dtype))


def test_assign_k1_is_a_permutation_of_the_batch_noise():
    latents = _latents((6, 4, 4, 4), torch.float32)
    noise, info = immiscible.select_noise(latents, 1, seed=3, mode="assign", return_info=True)
    assert sorted(info.index.tolist()) == list(range(6))
    pool = immiscible.candidates(latents, 1, seed=3, mode="assign")
    assert torch.equal(noise.sort(0).values, pool.sort(0).values)


def test_cosine_metric_picks_the_most_aligned_candidate():
    latents = _latents((3, 4, 8, 8), torch.float32)
    noise, info = immiscible.select_noise(latents, 16, seed=2, metric="cosine", return_info=True)
    cands = immiscible.candidates(latents, 16, seed=2).double().flatten(2)
    x = latents.double().flatten(1)[:, None, :]
    cos = (cands * x).sum(-1) / (cands.norm(dim=-1) * x.norm(dim=-1))
    assert torch.equal(info.index, cos.argmax(1))
    torch.testing.assert_close(info.cosine.double(), cos.max(1).values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_at_flux_size_where_fp16_cdist_fails(dtype):
    # [2, 16, 128, 128]: 262144 elements per sample. An fp16 cdist returns inf for every pair here.
    latents = _latents((2, 16, 128, 128), dtype, seed=4)
    noise, info = immiscible.select_noise(latents, 64, seed=9, return_info=True, backend="torch")
    cands = immiscible.candidates(latents, 64, seed=9, backend="torch")
    dist = torch.stack([fp64_distances_knn(latents[b : b + 1], cands[b : b + 1])[0] for b in range(2)])
    assert torch.equal(info.index, dist.argmin(1))
    assert torch.equal(noise, cands[torch.arange(2), info.index].to(dtype))
    assert info.reduction > 0.002  # about 2.9/sqrt(D) in squared distance for k=64


def test_deterministic_and_independent_of_chunking():
    latents = _latents((3, 4, 8, 8), torch.float32)
    base, info = immiscible.select_noise(latents, 20, seed=123, return_info=True)
    for chunk_bytes in (1, 4 * 256 * 3, 10**9):
        again, info2 = immiscible.select_noise(latents, 20, seed=123, return_info=True, chunk_bytes=chunk_bytes)
        assert torch.equal(base, again) and torch.equal(info.index, info2.index)
    other = immiscible.select_noise(latents, 20, seed=124)
    assert not torch.equal(base, other)


@pytest.mark.parametrize("shape,k", [((2, 4, 64, 64), 10), ((3, 64), 70), ((2, 5, 7, 3), 9)])
def test_candidate_groups_do_not_leak_into_results(shape, k):
    # Small samples are drawn G at a time (G = min(k, 65536 // D)); chunks of any size, and k
    # that is not a multiple of G, must not change anything.
    latents = _latents(shape, torch.float32, seed=2)
    numel = latents[0].numel()
    base, info = immiscible.select_noise(latents, k, seed=77, return_info=True)
    for rows in (1, 3, 5, k + 1):
        again, info2 = immiscible.select_noise(latents, k, seed=77, return_info=True, chunk_bytes=4 * numel * rows)
        assert torch.equal(base, again) and torch.equal(info.index, info2.index)
    cands = immiscible.candidates(latents, k, seed=77)
    assert torch.equal(info.index, fp64_distances_knn(latents, cands).argmin(1))
    flat = cands.flatten(0, 1).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0], "every candidate is a distinct draw"


@pytest.mark.parametrize("backend,k", [("torch", 1), ("torch", 5), ("torch", 40), ("triton", 1), ("triton", 6)])
def test_a_sample_is_keyed_by_its_id_not_its_batch_position(backend, k):
    latents = _latents((4, 3, 8, 8), torch.float32, seed=6, backend=backend)
    ids = [7, 0, 123456, 2**32 - 1]
    noise, info = immiscible.select_noise(latents, k, seed=21, sample_ids=ids, return_info=True, backend=backend)
    assert info.sample_ids == ids
    order = [2, 0, 3, 1]
    shuffled = immiscible.select_noise(latents[order], k, seed=21, sample_ids=[ids[i] for i in order],
                                       backend=backend)
    assert torch.equal(shuffled, noise[order])
    for b in range(4):  # alone, in a batch of one, each sample gets the same noise
        alone = immiscible.select_noise(latents[b : b + 1], k, seed=21, sample_ids=[ids[b]], backend=backend)
        assert torch.equal(alone[0], noise[b])
    cands = immiscible.candidates(latents, k, seed=21, sample_ids=ids, backend=backend)
    assert torch.equal(noise, cands[torch.arange(4), info.index])
    default = immiscible.select_noise(latents, k, seed=21, backend=backend)
    assert torch.equal(default, immiscible.select_noise(latents, k, seed=21, sample_ids=range(4), backend=backend))


@pytest.mark.parametrize("mode,columns", [("knn", 9), ("assign", 9 * 3)])
def test_info_carries_every_candidate_score(mode, columns):
    latents = _latents((3, 4, 8, 8), torch.float32, seed=3)
    noise, info = immiscible.select_noise(latents, 9, seed=4, mode=mode, return_info=True)
    cands = immiscible.candidates(latents, 9, seed=4, mode=mode)
    ref = fp64_distances_knn(latents, cands) if mode == "knn" else fp64_distances_pool(latents, cands)
    assert info.distances.shape == info.cosines.shape == (3, columns)
    torch.testing.assert_close(info.distances.double(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(info.mean_distance, info.distances.mean(1))
    torch.testing.assert_close(info.distance, info.distances.gather(1, info.index[:, None])[:, 0])
    flat = cands.flatten(2) if mode == "knn" else cands.flatten(1)[None].expand(3, -1, -1)
    x = latents.double().flatten(1)[:, None, :]
    cos = (flat.double() * x).sum(-1) / (flat.double().norm(dim=-1) * x.norm(dim=-1))
    torch.testing.assert_close(info.cosines.double(), cos, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ids,exc,match", [
    ([0, 1], ValueError, "one id per sample"),
    ([0, 1, -1], ValueError, r"sample_ids\[i\] must be in \[0, 4294967295\]"),
    ([0, 1, 2**32], ValueError, r"sample_ids\[i\] must be in"),
    ([0, 1, 2.0], TypeError, "must be an integer"),
    (torch.zeros(3), TypeError, "1-D integer tensor"),
    (5, TypeError, "sequence of 3 integers"),
])
def test_bad_sample_ids_are_rejected(ids, exc, match):
    with pytest.raises(exc, match=match):
        immiscible.select_noise(torch.zeros(3, 4), 4, seed=0, sample_ids=ids)


def test_seed_none_is_governed_by_torch_manual_seed():
    latents = _latents((2, 4, 8, 8), torch.float32)
    torch.manual_seed(42)
    a = immiscible.select_noise(latents, 8)
    torch.manual_seed(42)
    b = immiscible.select_noise(latents, 8)
    torch.manual_seed(43)
    c = immiscible.select_noise(latents, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_input_is_not_modified():
    latents = _latents((2, 4, 8, 8), torch.float16)
    before = latents.clone()
    immiscible.select_noise(latents, 8, seed=0)
    immiscible.select_noise(latents, 2, seed=0, mode="assign")
    assert torch.equal(latents, before)


def test_triton_failure_falls_back_to_torch_and_warns_once(monkeypatch, caplog):
    from immiscible.kernels import philox_knn

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(philox_knn, "knn_partial_scores", broken)
    monkeypatch.setattr(select_mod, "_disabled", {})
    latents = _latents((2, 4, 8, 8), torch.float32, backend="triton")
    expected = immiscible.select_noise(latents, 6, seed=1, backend="torch")
    with caplog.at_level(logging.WARNING, logger="immiscible.select"):
        for _ in range(3):
            noise, info = immiscible.select_noise(latents, 6, seed=1, backend="triton", return_info=True)
            assert torch.equal(noise, expected) and info.backend == "torch"
    warnings = [r for r in caplog.records if "uses torch from now on" in r.getMessage()]
    assert len(warnings) == 1 and "simulated kernel failure" in warnings[0].getMessage()
    assert len(calls) == 1, "after the failure the kernel is not tried again"
    assert "triton" in immiscible.disabled_backends()
    assert immiscible.resolve_backend("triton", latents.device) == "torch"
    immiscible.reset_fallback()
    assert immiscible.resolve_backend("triton", latents.device) == "triton"


def test_auto_backend_on_cpu_is_torch():
    assert immiscible.resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the interpreter is not in use")
def test_triton_on_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        immiscible.select_noise(torch.randn(1, 4, 2, 2), 2, seed=0, backend="triton")


GOOD = torch.zeros(2, 4, 4, 4)


@pytest.mark.parametrize("latents,k,kwargs,exc,match", [
    (GOOD, 0, {}, ValueError, r"k must be in \[1, 65536\]"),
    (GOOD, -3, {}, ValueError, r"k must be in \[1, 65536\]"),
    (GOOD, 10**9, {}, ValueError, r"k must be in \[1, 65536\]"),
    (GOOD, 2.5, {}, TypeError, "k must be an integer"),
    (GOOD, "64", {}, TypeError, "k must be an integer"),
    (GOOD, True, {}, TypeError, "k must be an integer"),
    (torch.zeros(2, 4, 4, 4, dtype=torch.int64), 4, {}, TypeError, "floating dtype"),
    (torch.zeros(2, 4, 4, 4, dtype=torch.bool), 4, {}, TypeError, "floating dtype"),
    (torch.zeros(0, 4, 4, 4), 4, {}, ValueError, "at least one sample"),
    (torch.zeros(8), 4, {}, ValueError, "at least 2 dims"),
    (torch.zeros(2, 0, 4), 4, {}, ValueError, "at least one element"),
    (torch.tensor([[0.0, float("nan")]]), 4, {}, ValueError, "NaN or Inf"),
    (torch.tensor([[0.0, float("inf")]]), 4, {}, ValueError, "NaN or Inf"),
    (GOOD, 4, {"mode": "hungarian"}, ValueError, "mode must be one of 'knn', 'assign'"),
    (GOOD, 4, {"metric": "l1"}, ValueError, "metric must be one of 'l2', 'cosine'"),
    (GOOD, 4, {"backend": "cuda"}, ValueError, "backend must be one of 'auto', 'torch', 'triton'"),
    (GOOD, 4, {"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*64\)"),
    (GOOD, 4, {"seed": 1.5}, TypeError, "seed must be None or an integer"),
    (torch.zeros(4096, 1), 16, {"mode": "assign"}, ValueError, "batch\\*\\*2 \\* k must be at most"),
    ([[1.0, 2.0]], 4, {}, TypeError, "latents must be a torch.Tensor"),
])
def test_bad_input_is_rejected_with_a_clear_message(latents, k, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        immiscible.select_noise(latents, k, **kwargs)


def test_candidates_needs_a_seed():
    with pytest.raises(ValueError, match="explicit seed"):
        immiscible.candidates(GOOD, 4, seed=None)
