"""The demo's distances on cases with a known answer."""
import math

import pytest
import torch

from immiscible_lab.experiment import metrics

pytest.importorskip("scipy")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_w2_identical_is_zero():
    x = torch.randn(200, 2, generator=_gen())
    assert metrics.w2_exact(x, x) == pytest.approx(0.0, abs=1e-12)


def test_w2_of_a_permutation_is_zero():
    x = torch.randn(100, 3, generator=_gen())
    assert metrics.w2_exact(x, x[torch.randperm(100, generator=_gen(1))]) == pytest.approx(0.0, abs=1e-12)


def test_w2_shift_is_the_shift_length():
    # A translation by m is optimal transport (identity plan); W2 = |m| exactly.
    x = torch.randn(300, 2, generator=_gen())
    m = torch.tensor([0.3, -0.4])
    assert metrics.w2_exact(x, x + m) == pytest.approx(0.5, rel=1e-6)


def test_w2_two_point_masses():
    x = torch.zeros(10, 4)
    y = torch.full((10, 4), 2.0)
    assert metrics.w2_exact(x, y) == pytest.approx(4.0)  # sqrt(4 * 2^2)


def test_w2_rejects_unequal_sizes():
    with pytest.raises(ValueError):
        metrics.w2_exact(torch.zeros(3, 2), torch.zeros(4, 2))


def test_frechet_gaussian_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())  # 5 + (1 + 1 + 4)
    got = metrics.frechet_gaussian(mu1.double(), torch.diag(s1).double(), mu2.double(), torch.diag(s2).double())
    assert got == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(11.0)


def test_frechet_identical_is_zero_and_shift_is_squared_length():
    x = torch.randn(2000, 8, generator=_gen())
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    m = torch.linspace(-1, 1, 8)
    assert metrics.frechet_distance(x, x + m) == pytest.approx(float(m.square().sum()), rel=1e-6)


def test_frechet_of_samples_approaches_the_population_value():
    g = _gen(3)
    x = torch.randn(20000, 4, generator=g)
    y = 2.0 * torch.randn(20000, 4, generator=g) + 1.0
    # |mu|^2 = 4, tr(I + 4I - 2 * 2I) = 4 -> 8
    assert metrics.frechet_distance(x, y) == pytest.approx(8.0, rel=0.05)


def test_mmd_identical_is_zero():
    x = torch.randn(100, 2, generator=_gen())
    assert metrics.mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)


def test_mmd_point_masses_known_value():
    x, y = torch.zeros(5, 2), torch.full((7, 2), 1.0)  # |m|^2 = 2
    assert metrics.mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(2.0 - 2.0 * math.exp(-1.0))


def test_mmd_shifted_gaussians_population_value():
    g = _gen(5)
    sigma, ell, d = 1.0, 1.0, 2
    x = torch.randn(3000, d, generator=g)
    delta = torch.tensor([1.0, 0.0])
    y = torch.randn(3000, d, generator=g) + delta
    c = (ell**2 / (ell**2 + 2 * sigma**2)) ** (d / 2)
    expected = 2 * c * (1 - math.exp(-float(delta.square().sum()) / (2 * (ell**2 + 2 * sigma**2))))
    assert metrics.mmd_rbf(x, y, bandwidth=ell) == pytest.approx(expected, abs=0.01)


def test_mmd_multi_identical_is_zero_and_averages_bandwidths():
    x = torch.randn(64, 3, generator=_gen())
    assert metrics.mmd_rbf_multi(x, x, (0.5, 1.0, 2.0)) == pytest.approx(0.0, abs=1e-12)
    y = x + 1.0
    both = metrics.mmd_rbf_multi(x, y, (0.5, 2.0))
    assert both == pytest.approx((metrics.mmd_rbf(x, y, bandwidth=0.5) + metrics.mmd_rbf(x, y, bandwidth=2.0)) / 2)
    with pytest.raises(ValueError):
        metrics.mmd_rbf_multi(x, y, ())


def test_mmd_multi_point_masses_known_value():
    x, y = torch.zeros(4, 2), torch.full((6, 2), 1.0)   # |m|^2 = 2
    expected = sum(2.0 - 2.0 * math.exp(-2.0 / (2 * b * b)) for b in (1.0, 2.0)) / 2
    assert metrics.mmd_rbf_multi(x, y, (1.0, 2.0)) == pytest.approx(expected)


def test_a_diverged_sampler_scores_finite_and_bad():
    ref = torch.randn(32, 2, generator=_gen())
    bad = torch.full((32, 2), float("nan"))
    score = metrics.sample_quality(bad, ref, "mmd", bandwidths=(1.0,))
    assert math.isfinite(score) and score > metrics.sample_quality(ref + 0.1, ref, "mmd", bandwidths=(1.0,))


@pytest.mark.parametrize("name", ["digits", "patches16"])
def test_the_image_metric_fails_the_moment_matched_gaussian(name):
    """The point of the metric: a Gaussian with the data's mean and covariance scores far above
    held-out data (the floor), and identical sets score 0."""
    pytest.importorskip("sklearn")
    from immiscible_lab.experiment.data import load_dataset, moment_matched_gaussian

    d = load_dataset(name)
    n = 384
    ref = d.holdout[:n]
    floor = metrics.dataset_quality(d, d.train[torch.randperm(d.train.shape[0], generator=_gen(1))[:n]], ref)
    gauss = metrics.dataset_quality(d, moment_matched_gaussian(d, n), ref)
    assert metrics.dataset_quality(d, ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert gauss > 3.0 * floor, (gauss, floor)
    # and it is not fooled by pixel noise far below the data's own variation
    noisy = metrics.dataset_quality(d, ref + 0.02 * torch.randn(ref.shape, generator=_gen(2)), ref)
    assert noisy < floor


def test_moment_matched_gaussian_has_the_data_moments():
    from immiscible_lab.experiment.data import load_dataset, moment_matched_gaussian

    d = load_dataset("gmm")
    g = moment_matched_gaussian(d, 20000, seed=3)
    assert torch.allclose(g.mean(0), d.train.mean(0), atol=0.05)
    assert torch.allclose(torch.cov(g.T), torch.cov(d.train.T), atol=0.08)
    # the ring is not a Gaussian: W2 to held-out data is far above data-vs-data
    ref = d.holdout[:512]
    assert metrics.w2_exact(g[:512], ref) > 1.5 * metrics.w2_exact(d.train[:512], ref)


def test_straightness_gap():
    a = torch.zeros(4, 3)
    assert metrics.straightness_gap(a, a) == 0.0
    assert metrics.straightness_gap(a, a + 2.0) == pytest.approx(4.0)


def test_sample_quality_dispatch():
    x = torch.randn(50, 2, generator=_gen())
    assert metrics.sample_quality(x, x + torch.tensor([3.0, 4.0]), "w2") == pytest.approx(5.0, rel=1e-6)
    assert metrics.sample_quality(x, x, "fd", lambda t: t) == pytest.approx(0.0, abs=1e-8)
    assert metrics.sample_quality(x, x, "mmd", lambda t: t, (1.0,)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        metrics.sample_quality(x, x, "fid")
