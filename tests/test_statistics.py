"""Statistics of the selected noise: what selection does to the Gaussian, and by how much."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import immiscible


def expected_max_of_normals(k: int) -> float:
    """E[max of k iid N(0,1)] by numerical integration (an independent reference)."""
    x = np.linspace(-10, 10, 200001)
    pdf = k * stats.norm.pdf(x) * stats.norm.cdf(x) ** (k - 1)
    return float(np.trapezoid(x * pdf, x))


def test_reduction_matches_the_analytic_order_of_magnitude():
    # For unit-variance latents, |x - n|^2 over candidates is ~ N(2D, 6D), so the nearest of k
    # lies E[max_k Z] * sqrt(6D) below the mean: reduction ~ E[max_k Z] * sqrt(6) / (2 sqrt(D)).
    # At D=16384, k=64 that is 2.3% in squared distance (1.1% in plain distance, the notes' figure).
    d, k = 16384, 64
    latents = torch.randn(24, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    _, info = immiscible.select_noise(latents, k, seed=1, return_info=True)
    expected = expected_max_of_normals(k) * math.sqrt(6) / (2 * math.sqrt(d))
    assert 0.85 * expected < info.reduction < 1.15 * expected
    plain = 1 - math.sqrt(1 - info.reduction)
    assert 0.008 < plain < 0.014


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_selected_noise_is_close_to_standard_normal_in_high_dimension(metric):
    latents = torch.randn(16, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = immiscible.select_noise(latents, 64, seed=2, metric=metric)
    assert abs(float(noise.mean())) < 0.01
    assert abs(float(noise.std()) - 1.0) < 0.02


def test_l2_shrinks_the_noise_norm_and_cosine_keeps_it_gaussian():
    # At D=64, k=64: L2 picks short candidates (|n|^2/D about 0.79); cosine leaves |n|^2 ~ chi2(D).
    d, k, b = 64, 64, 1500
    latents = torch.randn(b, d, generator=torch.Generator().manual_seed(3))
    l2 = immiscible.select_noise(latents, k, seed=4, metric="l2")
    cos = immiscible.select_noise(latents, k, seed=4, metric="cosine")
    l2_norm = (l2.double().square().sum(1) / d).numpy()
    cos_norm_sq = cos.double().square().sum(1).numpy()
    assert 0.72 < l2_norm.mean() < 0.86
    assert abs(cos_norm_sq.mean() / d - 1.0) < 4 * math.sqrt(2 / d) / math.sqrt(b)
    assert stats.kstest(cos_norm_sq, stats.chi2(df=d).cdf).pvalue > 1e-3
    assert stats.kstest(l2_norm * d, stats.chi2(df=d).cdf).pvalue < 1e-6
    # and cosine still aligns the noise with the latent
    x = latents.double()
    align = (cos.double() * x).sum(1) / (cos.double().norm(dim=1) * x.norm(dim=1))
    assert float(align.mean()) > 1.5 / math.sqrt(d)


def test_assign_keeps_the_marginal_gaussian():
    latents = torch.randn(256, 64, generator=torch.Generator().manual_seed(5))
    noise = immiscible.select_noise(latents, 1, seed=6, mode="assign")
    flat = noise.flatten().double().numpy()
    assert stats.kstest(flat, "norm").pvalue > 1e-3
