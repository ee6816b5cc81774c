"""The Philox kernels against their NumPy reference (kernels/philox_ref.py).

On a CPU these run under TRITON_INTERPRET=1 (see conftest) and must match bit for bit; on a GPU
libdevice's log and fused multiply-adds may differ by a few ulp, so the comparison there has a tolerance.
The compiled kernels' resources are checked for every GPU generation by tests/test_aot.py.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton")
from immiscible.kernels import philox_knn, philox_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = DEVICE == "cpu"


def _compare(actual: torch.Tensor, expected: np.ndarray):
    actual = actual.cpu().numpy()
    if EXACT:
        np.testing.assert_array_equal(actual, expected)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_philox_matches_the_random123_known_answer():
    # Random123's kat_vectors: philox4x32 10 rounds, counter = key = 0 ... and all-ones.
    out = philox_ref.philox4x32(0, *[np.uint32(0)] * 4)
    assert [int(v) for v in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    out = philox_ref.philox4x32((ones << 32) | ones, *[np.uint32(ones)] * 4)
    assert [int(v) for v in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("numel", [1, 7, 64, 1029])
@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 77])
def test_write_candidates_matches_reference(numel, seed):
    rows = [(0, 0), (3, 5), (1, 2**20 + 3)]
    sample = torch.tensor([r[0] for r in rows])
    index = torch.tensor([r[1] for r in rows])
    for stream in (0, 1):
        out = torch.empty(len(rows), numel, device=DEVICE)
        philox_knn.write_candidates(out, seed, sample, index, stream)
        for i, (s, j) in enumerate(rows):
            _compare(out[i], philox_ref.candidate(seed, s, j, stream, numel))


def test_streams_and_candidates_are_distinct():
    out = torch.empty(3, 256, device=DEVICE)
    philox_knn.write_candidates(out, 1, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), 0)
    other = torch.empty(1, 256, device=DEVICE)
    philox_knn.write_candidates(other, 1, torch.tensor([0]), torch.tensor([0]), 1)
    rows = [out[0], out[1], out[2], other[0]]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(rows[a], rows[b])


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), k=st.integers(1, 9), numel=st.integers(1, 300), seed=st.integers(0, 2**63 - 1))
def test_fused_partial_scores_match_materialized_candidates(batch, k, numel, seed):
    x = torch.randn(batch, numel, generator=torch.Generator().manual_seed(seed % 1000)).to(DEVICE)
    nn, xn = philox_knn.knn_partial_scores(x, k, seed)
    cands = torch.empty(batch * k, numel, device=DEVICE)
    sample = torch.arange(batch).repeat_interleave(k)
    index = torch.arange(k).repeat(batch)
    philox_knn.write_candidates(cands, seed, sample, index, 0)
    cands = cands.double().reshape(batch, k, numel)
    torch.testing.assert_close(nn.double(), cands.square().sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xn.double(), (cands * x.double()[:, None]).sum(-1), rtol=1e-5, atol=1e-4)


def test_partial_scores_split_over_d_match_the_unsplit_sums():
    # On a GPU the launcher splits D across programs when B * ceil(k / BLOCK_J) is small; the
    # interpreter does not by default, so this runs that path explicitly.
    x = torch.randn(2, 3001, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grid, *_ = philox_knn.knn_partial_scores_launch(x, 5, 99, split_d=True)
    assert grid[2] > 1
    nn, xn = philox_knn.knn_partial_scores(x, 5, 99, split_d=True)
    nn1, xn1 = philox_knn.knn_partial_scores(x, 5, 99, split_d=False)
    torch.testing.assert_close(nn, nn1, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(xn, xn1, rtol=1e-5, atol=1e-3)
    cands = torch.empty(10, 3001, device=DEVICE)
    philox_knn.write_candidates(cands, 99, torch.arange(2).repeat_interleave(5), torch.arange(5).repeat(2), 0)
    cands = cands.double().reshape(2, 5, 3001)
    torch.testing.assert_close(nn.double(), cands.square().sum(-1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(xn.double(), (cands * x.double()[:, None]).sum(-1), rtol=1e-5, atol=1e-3)


def test_sincos_2pi_is_accurate_to_float32():
    u = np.concatenate([np.arange(0, 2**31, 4099, dtype=np.int64).astype(np.float32) * np.float32(4.6566127342e-10),
                        np.float32([0.0, 0.125, 0.25, 0.375, 0.5, 0.75, np.nextafter(np.float32(1), 0)])])
    sin, cos = philox_ref.sincos_2pi(u.astype(np.float32))
    theta = 2 * np.pi * u.astype(np.float64)
    assert np.abs(sin - np.sin(theta)).max() < 2e-7 and np.abs(cos - np.cos(theta)).max() < 2e-7
    assert sin.dtype == cos.dtype == np.float32


def test_candidates_are_standard_normal():
    from scipy import stats

    out = torch.empty(4, 6000, device=DEVICE)
    philox_knn.write_candidates(out, 99, torch.arange(4), torch.zeros(4, dtype=torch.long), 0)
    flat = out.cpu().double().flatten().numpy()
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.02
    assert stats.kstest(flat, "norm").pvalue > 1e-3
