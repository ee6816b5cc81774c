"""Coarse selection (``select_noise(..., coarse=N)``) against a float64 reference: pool, then arg-min."""
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

import immiscible

BACKENDS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on the CPU (see conftest)
# (shape, N): H and W that N divides, that it does not (adaptive pooling's overlapping cells),
# a video latent [B, C, F, H, W] and a latent with no channel axis.
CASES = [((3, 4, 8, 8), 4), ((3, 4, 9, 7), 3), ((2, 2, 3, 6, 5), 2), ((3, 10, 6), 5)]


def _latents(shape, seed=0, backend="torch", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    # A smooth component, so that pooled ranking differs from full-resolution ranking.
    x = torch.randn(shape, generator=g) * 0.7 + torch.linspace(-1, 1, shape[-1])
    return x.to(dtype).to(device)


def pool64(t: torch.Tensor, n: int) -> torch.Tensor:
    """``[M, ..., H, W]`` -> ``[M, P]``: float64 adaptive average pooling written out cell by cell."""
    t = t.double()
    h, w = t.shape[-2:]
    cells = []
    for i in range(n):  # adaptive_avg_pool2d's cell edges: floor(i*H/n) .. ceil((i+1)*H/n)
        r0, r1 = (i * h) // n, math.ceil((i + 1) * h / n)
        for j in range(n):
            c0, c1 = (j * w) // n, math.ceil((j + 1) * w / n)
            cells.append(t[..., r0:r1, c0:c1].mean(dim=(-2, -1)))
    return torch.stack(cells, -1).flatten(1)


def scores64(a: torch.Tensor, b: torch.Tensor):
    """Squared distances and cosines of ``a [..., P]`` and ``b [..., P]`` (broadcast), float64."""
    return (a - b).square().sum(-1), (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,n", CASES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_knn_coarse_picks_the_pooled_fp64_argmin(backend, shape, n, metric):
    latents = _latents(shape, backend=backend)
    noise, info = immiscible.select_noise(latents, 9, seed=3, metric=metric, coarse=n, backend=backend,
                                          return_info=True)
    cands = immiscible.candidates(latents, 9, seed=3, backend=backend)
    px = pool64(latents, n)[:, None, :]                                    # [B, 1, P]
    pc = pool64(cands.flatten(0, 1), n).view(shape[0], 9, -1)              # [B, k, P]
    dist, cos = scores64(pc, px)
    assert torch.equal(info.index, (dist if metric == "l2" else -cos).argmin(1))
    assert torch.equal(noise, cands[torch.arange(shape[0]), info.index]), "the full-resolution candidate"
    torch.testing.assert_close(info.coarse_distances.double(), dist, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(info.coarse_cosines.double(), cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(info.coarse_cosine, info.coarse_cosines.gather(1, info.index[:, None])[:, 0])
    torch.testing.assert_close(info.coarse_mean_distance.double(), dist.mean(1), rtol=1e-4, atol=1e-4)
    full = (cands.double().flatten(2) - latents.double().flatten(1)[:, None]).square().sum(-1)
    torch.testing.assert_close(info.distances.double(), full, rtol=1e-4, atol=1e-3)  # today's fields stay full-size
    assert info.coarse == n and info.backend == backend
    if metric == "l2":
        assert 0.0 < info.coarse_reduction < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,n", CASES[:3])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_assign_coarse_matches_scipy_on_pooled_costs(backend, shape, n, metric, k):
    latents = _latents(shape, seed=1, backend=backend)
    noise, info = immiscible.select_noise(latents, k, seed=5, mode="assign", metric=metric, coarse=n,
                                          backend=backend, return_info=True)
    pool = immiscible.candidates(latents, k, seed=5, mode="assign", backend=backend)
    dist, cos = scores64(pool64(pool, n)[None], pool64(latents, n)[:, None])   # [B, pool]
    rows, cols = linear_sum_assignment((dist if metric == "l2" else 1.0 - cos).cpu().numpy())
    assert info.index.unique().numel() == shape[0], "distinct pool members"
    assert torch.equal(info.index.cpu()[torch.from_numpy(rows)], torch.from_numpy(cols).long())
    assert torch.equal(noise, pool[info.index])
    torch.testing.assert_close(info.coarse_distances.double(), dist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["knn", "assign"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_pooling_to_the_full_size_ranks_as_full_resolution_does(mode, metric):
    latents = _latents((3, 2, 5, 5), seed=7)
    plain, info = immiscible.select_noise(latents, 6, seed=9, mode=mode, metric=metric, return_info=True)
    same, cinfo = immiscible.select_noise(latents, 6, seed=9, mode=mode, metric=metric, coarse=5, return_info=True)
    assert torch.equal(plain, same) and torch.equal(info.index, cinfo.index)
    torch.testing.assert_close(cinfo.coarse_cosine, info.cosine)


def test_coarse_changes_the_choice_but_never_the_candidates():
    latents = _latents((8, 4, 16, 16), seed=2)
    _, full = immiscible.select_noise(latents, 32, seed=1, return_info=True)
    _, coarse = immiscible.select_noise(latents, 32, seed=1, coarse=2, return_info=True)
    assert not torch.equal(full.index, coarse.index)
    torch.testing.assert_close(full.distances, coarse.distances)  # the same 32 candidates, scored alike
    # Each ranks best in its own space: coarse wins the pooled cosine, full wins the full distance.
    assert float(coarse.coarse_cosine.mean()) > float(coarse.coarse_cosines.mean())
    assert float(full.distance.mean()) <= float(coarse.distance.mean())


def test_coarse_is_independent_of_chunking_and_batch_position():
    latents = _latents((3, 4, 8, 8), seed=4)
    base = immiscible.select_noise(latents, 20, seed=8, coarse=2)
    for chunk_bytes in (1, 4 * 256 * 3, 10**9):
        assert torch.equal(base, immiscible.select_noise(latents, 20, seed=8, coarse=2, chunk_bytes=chunk_bytes))
    alone = immiscible.select_noise(latents[2:], 20, seed=8, coarse=2, sample_ids=[2])
    assert torch.equal(alone[0], base[2])


def test_off_values_are_off():
    latents = _latents((2, 4, 8, 8))
    plain, info = immiscible.select_noise(latents, 5, seed=0, return_info=True)
    for off in (None, 0):
        again, info2 = immiscible.select_noise(latents, 5, seed=0, coarse=off, return_info=True)
        assert torch.equal(plain, again) and info2.coarse is None and info2.coarse_cosine is None
        assert info2.coarse_reduction is None


@pytest.mark.parametrize("shape,coarse,exc,match", [
    ((2, 4, 8, 8), -1, ValueError, r"coarse must be 0 \(off\) or an integer N in \[1, 1024\]"),
    ((2, 4, 8, 8), 9, ValueError, r"coarse must be in \[0, 8\] for latents of shape \(2, 4, 8, 8\)"),
    ((2, 4, 8, 6), 7, ValueError, r"coarse must be in \[0, 6\]"),
    ((2, 64), 4, ValueError, "needs latents with two spatial dimensions"),
    ((2, 4, 8, 8), 2.0, TypeError, "coarse must be 0 \\(off\\) or an integer"),
    ((2, 4, 8, 8), True, TypeError, "coarse must be 0 \\(off\\) or an integer"),
])
def test_bad_coarse_is_rejected_with_a_clear_message(shape, coarse, exc, match):
    with pytest.raises(exc, match=match):
        immiscible.select_noise(torch.zeros(shape), 4, seed=0, coarse=coarse)
    with pytest.raises(exc, match=match.replace("coarse", "immiscible_coarse", 1)):
        immiscible.check_coarse(coarse, shape, name="immiscible_coarse")
