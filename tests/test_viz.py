"""comfy_nodes.viz: pure rendering, tensors in, RGB arrays out."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import immiscible
from comfy_nodes import viz


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_latent_to_rgb_ranges_and_shapes():
    x = torch.randn(4, 6, 5, generator=_gen())
    plain = viz.latent_to_rgb(x)
    assert plain.shape == (6, 5, 3) and plain.dtype == np.float32
    assert plain.min() >= 0 and plain.max() <= 1
    np.testing.assert_allclose(plain[..., 0], np.clip(x[0].numpy() / 6 + 0.5, 0, 1), rtol=1e-6)
    factors = torch.randn(4, 3, generator=_gen(1)) * 0.3
    rgb = viz.latent_to_rgb(x, factors, [0.1, 0.0, -0.1])
    ref = np.clip((np.einsum("chw,cr->hwr", x.numpy(), factors.numpy()) + [0.1, 0.0, -0.1] + 1) / 2, 0, 1)
    np.testing.assert_allclose(rgb, ref, atol=1e-6)
    video = torch.randn(16, 5, 4, 4, generator=_gen(2))
    np.testing.assert_array_equal(viz.latent_to_rgb(video), viz.latent_to_rgb(video[:, 2]))
    assert viz.latent_to_rgb(torch.randn(1, 4, 4, generator=_gen())).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="rgb_factors"):
        viz.latent_to_rgb(x, torch.zeros(16, 3))
    with pytest.raises(ValueError, match="shape"):
        viz.latent_to_rgb(torch.zeros(4, 4))


def test_count_crossings():
    starts = np.array([[0, 0], [0, 1]])
    assert viz.count_crossings(starts, np.array([[1, 1], [1, 0]])) == 1   # an X
    assert viz.count_crossings(starts, np.array([[1, 0], [1, 1]])) == 0   # parallel
    assert viz.count_crossings(np.zeros((1, 2)), np.ones((1, 2))) == 0
    starts = np.array([[0, i] for i in range(4)], float)
    assert viz.count_crossings(starts, starts[::-1] + [1, 0]) == 6        # a full reversal crosses every pair


def test_noise_stats_against_direct_formulas():
    x, n = torch.randn(3, 4, 4, 4, generator=_gen()), torch.randn(3, 4, 4, 4, generator=_gen(1))
    st = viz.noise_stats(x, n)
    xf, nf = x.flatten(1), n.flatten(1)
    np.testing.assert_allclose(st["distance"], ((xf - nf) ** 2).sum(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(st["cosine"], torch.nn.functional.cosine_similarity(xf, nf).numpy(), atol=1e-6)
    np.testing.assert_allclose(st["std"], nf.std(1).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        viz.noise_stats(x, n[:2])


def test_pairing_projection_shapes_and_scale():
    x = torch.randn(5, 64, generator=_gen()) * 30
    n1, n2 = torch.randn(5, 64, generator=_gen(1)), torch.randn(5, 64, generator=_gen(2))
    lat, (p1, p2), scale = viz.pairing_projection(x, n1, n2)
    assert lat.shape == p1.shape == p2.shape == (5, 2) and scale > 1
    rms = np.sqrt((np.concatenate([p1, p2]) ** 2).sum(1).mean())
    assert np.sqrt((lat ** 2).sum(1).mean()) == pytest.approx(rms, rel=1e-6)
    lat1, (q,), _ = viz.pairing_projection(x[:1], n1[:1])   # one sample: basis completed
    assert lat1.shape == q.shape == (1, 2) and np.isfinite(q).all()


def _info(cand, cos, mean=None):
    """A SelectionInfo of candidate scores ``[B, M]`` (``mean`` overrides its candidate mean)."""
    index = cand.argmin(1)
    b = torch.arange(cand.shape[0])
    return immiscible.SelectionInfo(index=index, distance=cand[b, index],
                                    mean_distance=cand.mean(1) if mean is None else mean, cosine=cos[b, index],
                                    seed=0, k=cand.shape[1], mode="knn", metric="l2", backend="torch",
                                    distances=cand, cosines=cos)


def _data(batch, mean=None):
    x = torch.randn(batch, 4, 8, 8, generator=_gen()) + torch.linspace(-1, 1, 8)
    rnd, asg = torch.randn(x.shape, generator=_gen(2)), torch.randn(x.shape, generator=_gen(3))
    cand = torch.rand(batch, 16, generator=_gen(4)) * 10 + 250
    cos = torch.rand(batch, 16, generator=_gen(5)) * 0.1 - 0.05
    return viz.PreviewData(x, rnd, asg, x + rnd, x + asg, _info(cand, cos, mean), 0.5, {"k": 16, "mode": "knn"},
                           noisy_display_scale=0.7)


def test_preview_stats_and_rows():
    data = _data(3)
    stats = viz.preview_stats(data)
    b = torch.arange(3)
    np.testing.assert_allclose(stats.assigned["distance"], data.candidate_distances[b, data.chosen].numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(stats.assigned["cosine"], data.candidate_cosines[b, data.chosen].numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.assigned["std"], data.assigned_noise.flatten(1).std(1).numpy(), rtol=1e-5)
    ref = viz.noise_stats(data.latents, data.random_noise)
    for key in ref:
        np.testing.assert_array_equal(stats.random[key], ref[key])
    rnd, asg = viz.stats_rows(stats)
    cand_mean = data.candidate_distances.double().mean(1).numpy()
    expected = np.mean(1 - stats.assigned["distance"] / cand_mean) * 100
    assert asg["reduction_vs_candidates"] == pytest.approx(expected)
    assert asg["distance"] == pytest.approx(np.mean(stats.assigned["distance"]) / 256)
    assert rnd["reduction_vs_random"] == pytest.approx(0.0, abs=1e-12)


def test_reduction_is_the_cores_selection_info_not_recomputed():
    """Issue 16: the assigned noise's reduction and the candidate mean are SelectionInfo's fields
    (here deliberately not the mean of the distances, so a recomputation would show)."""
    data = _data(3, mean=torch.tensor([300.0, 280.0, 260.0]))
    sel = data.selection
    stats = viz.preview_stats(data)
    np.testing.assert_array_equal(stats.candidate_mean, sel.mean_distance.numpy())
    np.testing.assert_array_equal(stats.assigned["reduction"], sel.reduction_per_sample.numpy())
    rnd, asg = viz.stats_rows(stats)
    assert asg["reduction_vs_candidates"] == pytest.approx(sel.reduction * 100, rel=1e-6)
    # the random noise's: the same definition, 1 - d / mean d(candidates), for the random noise's distance
    d_rand = viz.noise_stats(data.latents, data.random_noise)["distance"]
    assert rnd["reduction_vs_candidates"] == pytest.approx(np.mean(1 - d_rand / sel.mean_distance.numpy()) * 100)


@pytest.mark.parametrize("batch", [1, 6])
def test_render_preview_sheet(batch):
    data = _data(batch)
    stats = viz.preview_stats(data)
    img = viz.render_preview_sheet(data, stats, dpi=50)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.std() > 10  # not blank
    text = viz.format_stats(data, stats)
    assert "random" in text and "assigned" in text and "k=16" in text
