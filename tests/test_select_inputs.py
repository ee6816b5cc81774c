"""What select_noise, candidates and coarse_pool do with unusual inputs: the largest magnitudes,
NaN/Inf, dtypes and layouts outside the accepted ones, strided views, and bad arguments.

Every input is either selected exactly (the float64 nearest) or refused with an error that names
the argument and what is accepted; nothing gives a silent index 0 or NaN statistics.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import immiscible
from immiscible import LATENT_ABS_MAX, LATENT_ABS_MIN, LATENT_DTYPES

BACKENDS = ["torch", "triton"]  # triton runs under TRITON_INTERPRET=1 on the CPU (see conftest)


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _scaled(shape, biggest, seed=0, backend="torch", dtype=torch.float32):
    """Gaussian latents scaled so that their largest |value| is exactly ``biggest``."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x / x.abs().max() * biggest
    x.view(-1)[x.abs().argmax()] = math.copysign(biggest, x.view(-1)[x.abs().argmax()].item())
    x = x.to(dtype)
    assert x.abs().max().item() == biggest
    return x.to(_device(backend))


def _pooled64(t, n):
    """``[M, ..., H, W]`` -> float64 ``[M, P]`` average-pooled to ``n x n`` (the space coarse ranks in)."""
    t = t.double()
    return F.adaptive_avg_pool2d(t.reshape(t.shape[0], -1, *t.shape[-2:]), n).flatten(1)


def _rank64(x, c, metric):
    """Float64 ranking of candidates ``c [..., C, P]`` for latents ``x [..., 1, P]``.

    l2 ranks by ``|n|^2 - 2 x.n``, which orders candidates as ``|x - n|^2`` does (``|x|^2`` is the
    same for all of a latent's candidates) without rounding a huge ``|x|^2``: products of fp32 values
    are exact in float64.
    """
    dots = (c * x).sum(-1)
    if metric == "l2":
        return c.square().sum(-1) - 2.0 * dots
    return -dots / (c.norm(dim=-1) * x.norm(dim=-1))


def _check_info_is_finite(info):
    for name in ("distance", "mean_distance", "cosine", "distances", "cosines"):
        assert torch.isfinite(getattr(info, name)).all(), name
    assert math.isfinite(info.reduction)


# --------------------------------------------------------------------------- huge latents


# 2**13: from about here a sample's |x|^2 (>= 2**26) no longer holds |n|^2 - 2 x.n exactly in fp32;
# 1e9 and LATENT_ABS_MAX used to give every sample candidate 0 (all distances rounded alike).
MAGNITUDES = [2.0**13, 1e9, LATENT_ABS_MAX]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("biggest", MAGNITUDES)
def test_knn_selects_the_fp64_nearest_up_to_the_largest_magnitude(backend, metric, biggest):
    shape, k = ((6, 2, 6, 6), 24) if backend == "torch" else ((3, 2, 4, 4), 8)
    latents = _scaled(shape, biggest, seed=1, backend=backend)
    noise, info = immiscible.select_noise(latents, k, seed=3, metric=metric, backend=backend, return_info=True)
    cands = immiscible.candidates(latents, k, seed=3, backend=backend)
    want = _rank64(latents.double().flatten(1)[:, None], cands.double().flatten(2), metric).argmin(1)
    assert torch.equal(info.index, want)
    assert torch.equal(noise, cands[torch.arange(shape[0]), info.index])
    assert info.backend == backend
    _check_info_is_finite(info)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("biggest", MAGNITUDES)
def test_knn_coarse_selects_the_pooled_fp64_nearest_up_to_the_largest_magnitude(backend, metric, biggest):
    shape, k, n = (4, 2, 6, 6), 12, 3
    latents = _scaled(shape, biggest, seed=2, backend=backend)
    _, info = immiscible.select_noise(latents, k, seed=5, metric=metric, coarse=n, backend=backend, return_info=True)
    cands = immiscible.candidates(latents, k, seed=5, backend=backend)
    pc = _pooled64(cands.flatten(0, 1), n).view(shape[0], k, -1)
    assert torch.equal(info.index, _rank64(_pooled64(latents, n)[:, None], pc, metric).argmin(1))
    _check_info_is_finite(info)
    assert torch.isfinite(info.coarse_distances).all() and math.isfinite(info.coarse_reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("coarse", [None, 2])
@pytest.mark.parametrize("biggest", MAGNITUDES[1:])
def test_assign_matches_scipy_up_to_the_largest_magnitude(backend, metric, coarse, biggest):
    shape, k = (4, 2, 4, 4), 3
    latents = _scaled(shape, biggest, seed=3, backend=backend)
    noise, info = immiscible.select_noise(latents, k, seed=7, mode="assign", metric=metric, coarse=coarse,
                                          backend=backend, return_info=True)
    pool = immiscible.candidates(latents, k, seed=7, mode="assign", backend=backend)
    pool64 = pool.double().flatten(1) if coarse is None else _pooled64(pool, coarse)
    x64 = latents.double().flatten(1) if coarse is None else _pooled64(latents, coarse)
    cost = _rank64(x64[:, None], pool64[None], metric)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    assert torch.equal(info.index.cpu()[torch.from_numpy(rows)], torch.from_numpy(cols).long())
    assert torch.equal(noise, pool[info.index])
    _check_info_is_finite(info)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_huge_sample_does_not_change_its_neighbours(backend):
    # Whether a row is ranked without |x|^2 is decided per sample: a normal sample gets the same
    # noise beside a huge one as alone.
    latents = torch.cat([_scaled((1, 2, 4, 4), 2.0, seed=4), _scaled((1, 2, 4, 4), 2.0**40, seed=5)]).to(_device(backend))
    both = immiscible.select_noise(latents, 8, seed=1, backend=backend)
    alone = immiscible.select_noise(latents[:1], 8, seed=1, backend=backend)
    assert torch.equal(both[:1], alone)


def _just_above(value, dtype):
    return torch.tensor(value, dtype=dtype).nextafter(torch.tensor(math.inf, dtype=dtype)).item()


def _assert_every_path_refuses(latents, backend, match):
    """knn, assign, cosine, coarse and ``candidates()`` all refuse ``latents`` with ``match``."""
    for kwargs in ({}, {"mode": "assign"}, {"metric": "cosine"}, {"coarse": 2}):
        with pytest.raises(ValueError, match=match):
            immiscible.select_noise(latents, 4, seed=0, backend=backend, **kwargs)
    with pytest.raises(ValueError, match=match):
        immiscible.candidates(latents, 4, seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", ["just_above", 1e19, -1e19, 3e38, 1e300])
def test_latents_beyond_the_largest_magnitude_are_refused(backend, dtype, value):
    value = _just_above(LATENT_ABS_MAX, dtype) if value == "just_above" else value
    if abs(value) > torch.finfo(dtype).max:
        pytest.skip("not a finite value of this dtype")
    latents = torch.zeros(2, 2, 4, 4, dtype=dtype, device=_device(backend))
    latents[1, 0, 2, 3] = value
    match = r"latents must have every \|value\| <= 1\.40737e\+14 \(immiscible\.LATENT_ABS_MAX = 2\*\*47, .*got a value"
    _assert_every_path_refuses(latents, backend, match)


def test_the_largest_magnitude_is_accepted_and_the_next_value_refused():
    latents = _scaled((2, 8), LATENT_ABS_MAX)
    immiscible.select_noise(latents, 4, seed=0)
    latents[0, 0] = _just_above(LATENT_ABS_MAX, torch.float32)
    with pytest.raises(ValueError, match=r"got a value of magnitude 1\.40737505e\+14"):
        immiscible.select_noise(latents, 4, seed=0)


# --------------------------------------------------------------------------- tiny latents


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_the_smallest_magnitude_is_selected_exactly_with_true_cosines(backend, metric):
    # A sample whose largest |value| is LATENT_ABS_MIN = 2**-63 still has |x|^2 >= 2**-126, a normal fp32.
    latents = torch.cat([_scaled((1, 2, 4, 4), 3.0, seed=6), _scaled((1, 2, 4, 4), LATENT_ABS_MIN, seed=7),
                         _scaled((1, 2, 4, 4), LATENT_ABS_MIN, seed=8)])
    latents = latents.to(_device(backend))
    _, info = immiscible.select_noise(latents, 8, seed=2, metric=metric, backend=backend, return_info=True)
    cands = immiscible.candidates(latents, 8, seed=2, backend=backend)
    x, c = latents.double().flatten(1)[:, None], cands.double().flatten(2)
    assert torch.equal(info.index, _rank64(x, c, metric).argmin(1))
    cos = (c * x).sum(-1) / (c.norm(dim=-1) * x.norm(dim=-1))
    torch.testing.assert_close(info.cosines.double(), cos, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,value", [(torch.float32, "just_below"), (torch.float64, "just_below"),
                                         (torch.float32, 1e-25), (torch.float32, 1e-44), (torch.float64, 1e-300)])
def test_a_sample_below_the_smallest_magnitude_is_refused(backend, dtype, value):
    # Below it the sample's |x|^2 underflows fp32: cosines of 2e6 were reported (1e-25), and float64
    # latents under fp32's range became zeros, so cosine selection gave every sample candidate 0.
    if value == "just_below":
        value = torch.tensor(LATENT_ABS_MIN, dtype=dtype).nextafter(torch.tensor(0.0, dtype=dtype)).item()
    latents = torch.randn(3, 2, 4, 4, dtype=dtype, device=_device(backend))
    latents[1] = 0.0
    latents[1, 1, 2, 2] = -value
    match = (r"latents\[1\] has no \|value\| above .* must be all zeros or have a value of magnitude at least "
             r"1\.0842e-19 \(immiscible\.LATENT_ABS_MIN = 2\*\*-63")
    _assert_every_path_refuses(latents, backend, match)


def test_an_all_zero_sample_is_accepted():
    # Every candidate is equally far in angle (cosine 0): the lowest index, as argmin breaks ties; l2
    # picks the shortest candidate, exactly.
    latents = torch.zeros(2, 2, 4, 4)
    latents[0] = torch.randn(2, 4, 4)
    _, info = immiscible.select_noise(latents, 8, seed=1, metric="cosine", return_info=True)
    assert info.index[1] == 0 and torch.equal(info.cosines[1], torch.zeros(8))
    _, info = immiscible.select_noise(latents, 8, seed=1, return_info=True)
    norms = immiscible.candidates(latents, 8, seed=1)[1].double().flatten(1).square().sum(1)
    assert info.index[1] == norms.argmin()


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_latents_are_refused(backend, dtype, bad):
    latents = torch.randn(3, 2, 4, 4).to(dtype).to(_device(backend))
    latents[2, 1, 3, 3] = bad  # the very last element
    for kwargs in ({}, {"mode": "assign"}, {"metric": "cosine"}, {"coarse": 2}):
        with pytest.raises(ValueError, match="latents contain NaN or Inf"):
            immiscible.select_noise(latents, 4, seed=0, backend=backend, **kwargs)
    with pytest.raises(ValueError, match="latents contain NaN or Inf"):
        immiscible.candidates(latents, 4, seed=0, backend=backend)


# --------------------------------------------------------------------------- dtypes, layouts, devices


FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, name)]
ACCEPTED = r"float16/bfloat16/float32/float64"


@pytest.mark.parametrize("dtype", FLOAT8 + [torch.complex64, torch.int64, torch.int8, torch.uint8, torch.bool])
def test_dtypes_outside_the_accepted_ones_are_refused(dtype):
    latents = torch.zeros(2, 4, 4, 4).to(dtype)
    with pytest.raises(TypeError, match=rf"latents must have a floating dtype \({ACCEPTED}\), got {dtype}"):
        immiscible.select_noise(latents, 4, seed=0)
    with pytest.raises(TypeError, match="latents must have a floating dtype"):
        immiscible.candidates(latents, 4, seed=0)
    with pytest.raises(TypeError, match="latents must have a floating dtype"):
        immiscible.coarse_pool(latents, 2)


def test_the_accepted_dtypes_are_the_vocabulary():
    assert LATENT_DTYPES == (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for dtype in LATENT_DTYPES:
        assert immiscible.select_noise(torch.ones(2, 4, 4, 4, dtype=dtype), 4, seed=0).dtype == dtype


@pytest.mark.parametrize("make,layout", [
    (lambda x: x.to_sparse(), "torch.sparse_coo"),
    (lambda x: x.reshape(2, -1).to_sparse_csr(), "torch.sparse_csr"),
    (lambda x: x.reshape(2, -1).to_sparse_csc(), "torch.sparse_csc"),
])
def test_sparse_latents_are_refused(make, layout):
    latents = make(torch.randn(2, 4, 4, 4))
    match = rf"latents must be a dense tensor \(layout torch.strided\), got layout {layout}"
    with pytest.raises(TypeError, match=match):
        immiscible.select_noise(latents, 4, seed=0)
    with pytest.raises(TypeError, match=match):
        immiscible.coarse_pool(latents, 2)


def test_nested_latents_are_refused():
    latents = torch.nested.nested_tensor([torch.zeros(4, 4), torch.zeros(4, 4)])
    with pytest.raises(TypeError, match=r"latents must be a dense tensor \(layout torch.strided\), got a nested"):
        immiscible.select_noise(latents, 4, seed=0)


def test_meta_latents_are_refused():
    latents = torch.zeros(2, 4, 4, 4, device="meta")
    with pytest.raises(ValueError, match="latents are on the meta device"):
        immiscible.select_noise(latents, 4, seed=0)
    with pytest.raises(ValueError, match="latents are on the meta device"):
        immiscible.coarse_pool(latents, 2)


@pytest.mark.parametrize("latents,match", [
    (torch.tensor(1.0), r"latents must have at least 2 dims \[B, ...\], got shape \(\)"),
    (torch.empty(0), r"latents must have at least 2 dims \[B, ...\], got shape \(0,\)"),
    (torch.empty(0, 4), "latents must hold at least one sample"),
    (torch.empty(3, 0, 2), "latents must have at least one element per sample"),
])
def test_zero_dim_and_empty_latents_are_refused(latents, match):
    with pytest.raises(ValueError, match=match):
        immiscible.select_noise(latents, 4, seed=0)


VIEWS = {
    "channels_last": lambda x: x.to(memory_format=torch.channels_last),
    "transposed": lambda x: x.transpose(2, 3),
    "sliced": lambda x: x[:, ::2],
    "expanded": lambda x: x[:1].expand(3, -1, -1, -1),
    "channels_last_3d": lambda x: x[:, :, None].expand(-1, -1, 2, -1, -1).contiguous(
        memory_format=torch.channels_last_3d),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("mode,coarse", [("knn", None), ("knn", 2), ("assign", None)])
def test_strided_views_select_as_their_contiguous_copy(backend, view, mode, coarse):
    latents = VIEWS[view](torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(9)).to(_device(backend)))
    assert not latents.is_contiguous()
    kwargs = dict(seed=2, mode=mode, coarse=coarse, backend=backend, return_info=True)
    noise, info = immiscible.select_noise(latents, 5, **kwargs)
    want, want_info = immiscible.select_noise(latents.contiguous(), 5, **kwargs)
    assert torch.equal(noise, want) and torch.equal(info.index, want_info.index)
    assert torch.equal(info.distances, want_info.distances)


# --------------------------------------------------------------------------- other arguments


GOOD = torch.zeros(2, 4, 4, 4)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"chunk_bytes": 0}, ValueError, r"chunk_bytes must be in \[1, "),
    ({"chunk_bytes": -8}, ValueError, r"chunk_bytes must be in \[1, "),
    ({"chunk_bytes": 1.5}, TypeError, r"chunk_bytes must be an integer in \[1, "),
    ({"chunk_bytes": "8"}, TypeError, r"chunk_bytes must be an integer in \[1, "),
    ({"chunk_bytes": True}, TypeError, r"chunk_bytes must be an integer in \[1, "),
    ({"return_info": "no"}, TypeError, "return_info must be true or false"),
    ({"return_info": 1}, TypeError, "return_info must be true or false"),
    ({"sample_ids": torch.tensor([1, 2], device="meta")}, ValueError, "sample_ids are on the meta device"),
    ({"sample_ids": torch.tensor([1, 2]).to_sparse()}, TypeError, r"sample_ids must be a dense 1-D integer tensor"),
    ({"sample_ids": torch.tensor([[1, 2]])}, TypeError, r"sample_ids must be a dense 1-D integer tensor"),
    ({"seed": torch.tensor(3)}, TypeError, r"seed must be None or an integer in \[0, 2\*\*64\)"),
    ({"seed": 2**64}, ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ({"generator": torch.Generator()}, TypeError, "unexpected keyword argument 'generator'"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        immiscible.select_noise(GOOD, 4, **{"seed": 0, **kwargs})


def test_valid_argument_types_still_work():
    import numpy as np

    base = immiscible.select_noise(GOOD, 4, seed=5, sample_ids=[3, 4], chunk_bytes=4096)
    same = immiscible.select_noise(GOOD, np.int64(4), seed=np.uint64(5), sample_ids=np.array([3, 4]),
                                   chunk_bytes=np.int32(4096))
    also = immiscible.select_noise(GOOD, 4, seed=5, sample_ids=torch.tensor([3, 4], dtype=torch.uint8))
    assert torch.equal(base, same) and torch.equal(base, also)


def test_duplicate_sample_ids_share_candidates_by_design():
    # ComfyUI's batch_index may repeat an index ([4, 9, 4]): the same id is the same draw, as it is
    # for ComfyUI's own noise. Duplicates are accepted; equal (id, latent) pairs get equal noise.
    latents = torch.randn(3, 4, 4, 4)
    latents[2] = latents[0]
    noise = immiscible.select_noise(latents, 8, seed=1, sample_ids=[4, 9, 4])
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])


@pytest.mark.parametrize("device,exc,match", [
    ("nonsense", ValueError, "device must be a torch.device or a device string"),
    (None, TypeError, "device must be a torch.device or a device string"),
    (1.5, TypeError, "device must be a torch.device or a device string"),
])
def test_resolve_backend_names_a_bad_device(device, exc, match):
    with pytest.raises(exc, match=match):
        immiscible.resolve_backend("auto", device)


# --------------------------------------------------------------------------- coarse_pool


def test_coarse_pool_is_adaptive_average_pooling():
    x = torch.randn(2, 3, 5, 7)
    want = F.adaptive_avg_pool2d(x, 2).flatten(1)
    assert torch.equal(immiscible.coarse_pool(x, 2), want)
    assert torch.equal(immiscible.coarse_pool(x.to(memory_format=torch.channels_last), 2), want)
    assert immiscible.coarse_pool(torch.randn(2, 2, 3, 4, 4), 4).shape == (2, 2 * 3 * 16)


@pytest.mark.parametrize("latents,size,exc,match", [
    (torch.zeros(2, 4, 4, 4), 0, ValueError, r"size must be in \[1, 4\] \(N x N pooling of a 4 x 4 latent\), got 0"),
    (torch.zeros(2, 4, 4, 4), 5, ValueError, r"size must be in \[1, 4\]"),
    (torch.zeros(2, 4, 4, 6), -1, ValueError, r"size must be in \[1, 4\]"),
    (torch.zeros(2, 4, 4, 4), 2.0, TypeError, "size must be an integer"),
    (torch.zeros(2, 4, 4, 4), "2", TypeError, "size must be an integer"),
    (torch.zeros(2, 4), 2, ValueError, r"coarse_pool needs latents \[B, ..., H, W\]"),
    ([[1.0, 2.0]], 2, TypeError, "latents must be a torch.Tensor"),
])
def test_coarse_pool_rejects_bad_input_with_a_clear_message(latents, size, exc, match):
    with pytest.raises(exc, match=match):
        immiscible.coarse_pool(latents, size)


@pytest.mark.parametrize("shape", [None, 8, "2, 4, 8, 8", (2, 4, 8.0, 8)])
def test_check_coarse_names_a_bad_shape(shape):
    with pytest.raises(TypeError, match=r"shape must be the latents' shape, a sequence of ints \[B, ..., H, W\]"):
        immiscible.check_coarse(2, shape)
    assert immiscible.check_coarse(0, shape) is None  # off needs no shape
