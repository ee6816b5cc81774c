"""ComfyUI nodes with a fake ``comfy_api.latest`` (no ComfyUI needed)."""
from __future__ import annotations

import asyncio
import importlib
import logging
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import immiscible
from comfy_nodes import noise as cn
from comfy_nodes import viz

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- a fake comfy_api


class _Port:
    def __init__(self, id=None, display_name=None, optional=False, tooltip=None, advanced=None, **kw):
        self.id, self.optional, self.tooltip, self.advanced, self.kw = id, optional, tooltip, advanced, kw


class _Combo(_Port):
    def __init__(self, id, options=None, advanced=None, **kw):
        super().__init__(id, advanced=advanced, **kw)
        self.options = options


def _type(name, input_cls=_Port):
    return type(name, (), {"Input": input_cls, "Output": _Port, "io_type": name.upper()})


class _NodeOutput:
    def __init__(self, *args, ui=None):
        self.args = args


class _Schema:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Extension:
    pass


@pytest.fixture
def nodes(monkeypatch):
    io = types.SimpleNamespace(ComfyNode=object, Schema=_Schema, NodeOutput=_NodeOutput, Combo=_type("Combo", _Combo),
                               **{n: _type(n) for n in ("Int", "Float", "String", "Latent", "Model", "Image",
                                                        "Noise")})
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, _Extension
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.delitem(sys.modules, "comfy_nodes.nodes", raising=False)
    module = importlib.import_module("comfy_nodes.nodes")
    yield module
    sys.modules.pop("comfy_nodes.nodes", None)


def _latent(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(*shape, generator=g) * 2 + 0.5}


# --------------------------------------------------------------------------- schema


def test_schema_category_tooltips_seed_and_advanced(nodes):
    for node in nodes.NODES:
        schema = node.define_schema()
        assert schema.category == "sampling/noise/immiscible"
        for port in schema.inputs + schema.outputs:
            assert port.tooltip, f"{schema.node_id}.{port.id} has no tooltip"
        by_id = {p.id: p for p in schema.inputs}
        assert by_id["seed"].kw["max"] == 0xFFFFFFFFFFFFFFFF and by_id["seed"].kw["control_after_generate"]
        assert (by_id["k"].kw["min"], by_id["k"].kw["max"]) == (immiscible.K_MIN, immiscible.K_MAX)
        assert by_id["mode"].options == list(immiscible.MODES)
        assert by_id["metric"].options == list(immiscible.METRICS)
        assert by_id["model"].optional
        for knob in ("mode", "metric", "coarse", "latent_format"):
            assert by_id[knob].advanced is True
        assert (by_id["coarse"].kw["default"], by_id["coarse"].kw["min"], by_id["coarse"].optional) == (0, 0, True)
        assert by_id["coarse"].kw["max"] == immiscible.COARSE_MAX
        assert by_id["latent_format"].options == ["auto", "sd15", "sdxl", "sd3", "flux", "wan", "raw"]
    preview = nodes.ImmiscibleNoisePreview.define_schema()
    assert [o.id for o in preview.outputs] == ["sheet", "assigned_noise", "random_noise", "noisy_assigned",
                                               "noisy_random", "stats"]


def test_extension_lists_both_nodes(nodes):
    ext = asyncio.run(nodes.comfy_entrypoint())
    assert [n.__name__ for n in asyncio.run(ext.get_node_list())] == ["ImmiscibleNoise", "ImmiscibleNoisePreview",
                                                                       "TrainLoraImmiscible", "SaveLoraImmiscible"]


def test_root_init_is_light_and_exposes_entrypoint():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('pack', r'{REPO / '__init__.py'}', "
            f"submodule_search_locations=[r'{REPO}'])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['pack'] = m; spec.loader.exec_module(m)\n"
            "assert callable(m.comfy_entrypoint)\n"
            "heavy = [n for n in ('torch', 'numpy', 'matplotlib', 'immiscible') if n in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


# --------------------------------------------------------------------------- the NOISE source


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 16, 4, 4), (1, 16, 3, 4, 4)])
def test_noise_shape_dtype_device_and_determinism(nodes, shape):
    latent = _latent(*shape)
    source = nodes.ImmiscibleNoise.execute(seed=7, k=8).args[0]
    assert source.seed == 7
    noise = source.generate_noise(latent)
    assert noise.shape == latent["samples"].shape and noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, nodes.ImmiscibleNoise.execute(seed=7, k=8).args[0].generate_noise(latent))
    assert not torch.equal(noise, nodes.ImmiscibleNoise.execute(seed=8, k=8).args[0].generate_noise(latent))
    half = {"samples": latent["samples"].half()}
    assert source.generate_noise(half).dtype == torch.float16


def test_noise_is_nearer_than_random_and_in_model_space():
    latent = _latent(3, 4, 16, 16)
    source = cn.Noise_Immiscible(3, 32)
    chosen = source.generate_noise(latent)
    x = latent["samples"] * 0.18215  # sd15 process_in, chosen by auto for 4 channels
    rand = cn.comfy_random_noise(latent["samples"], 3)
    assert ((chosen - x) ** 2).sum() < ((rand - x) ** 2).sum()
    assert torch.allclose(((chosen - x) ** 2).flatten(1).sum(1), source.last_info.distance, rtol=1e-4)


def test_batch_index_gives_the_noise_of_the_full_batch():
    full = _latent(4, 4, 8, 8)
    whole = cn.Noise_Immiscible(5, 8).generate_noise(full)
    part = {"samples": full["samples"][[2, 0]], "batch_index": [2, 0]}
    assert torch.equal(cn.Noise_Immiscible(5, 8).generate_noise(part), whole[[2, 0]])
    one = {"samples": full["samples"][3:], "batch_index": [3]}
    assert torch.equal(cn.Noise_Immiscible(5, 8).generate_noise(one), whole[3:])


def test_one_selection_call_per_batch_keyed_by_batch_index(monkeypatch):
    calls = []
    real = immiscible.select_noise

    def spy(latents, k, **kw):
        calls.append((latents.shape[0], kw.get("sample_ids"), kw.get("seed")))
        return real(latents, k, **kw)

    monkeypatch.setattr(immiscible, "select_noise", spy)
    latent = _latent(3, 4, 8, 8)
    latent["batch_index"] = [4, 9, 4]
    noise = cn.Noise_Immiscible(6, 8).generate_noise(latent)
    assert calls == [(3, [4, 9, 4], 6)]
    assert torch.equal(noise, real(latent["samples"] * 0.18215, 8, seed=6, backend="torch", sample_ids=[4, 9, 4]))
    cn.preview(latent, 8, "knn", "l2", 6, 0.5)
    assert len(calls) == 2


@pytest.mark.parametrize("batch_index, error", [([0, -1], ValueError), ([0, 2**32], ValueError),
                                                ([0, 1.5], TypeError), ([0], ValueError)])
def test_bad_batch_index_raises(batch_index, error):
    latent = _latent(2, 4, 8, 8)
    latent["batch_index"] = batch_index
    with pytest.raises(error, match="batch_index"):
        cn.Noise_Immiscible(0, 4).generate_noise(latent)


def test_random_noise_matches_prepare_noise_semantics():
    samples = torch.zeros(3, 4, 4, 4)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        ref = torch.randn(samples.size())
        torch.manual_seed(11)
        draws = [torch.randn(1, 4, 4, 4) for _ in range(4)]
    assert torch.equal(cn.comfy_random_noise(samples, 11), ref)
    got = cn.comfy_random_noise(samples, 11, [3, 1, 3])
    assert torch.equal(got, torch.cat([draws[3], draws[1], draws[3]]))


def test_all_zero_latent_gives_plain_noise_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(cn, "_logged_zero", False)
    empty = {"samples": torch.zeros(2, 4, 8, 8)}
    with caplog.at_level(logging.INFO, logger="comfy_nodes.noise"):
        a = cn.Noise_Immiscible(9, 16).generate_noise(empty)
        b = cn.Noise_Immiscible(9, 16).generate_noise(empty)
    assert torch.equal(a, cn.comfy_random_noise(empty["samples"], 9)) and torch.equal(a, b)
    assert sum("all zeros" in r.getMessage() for r in caplog.records) == 1


def test_assign_mode_and_cosine_metric():
    latent = _latent(3, 4, 8, 8)
    a = cn.Noise_Immiscible(1, 4, mode="assign").generate_noise(latent)
    c = cn.Noise_Immiscible(1, 4, metric="cosine").generate_noise(latent)
    assert a.shape == c.shape == latent["samples"].shape


def test_coarse_noise_is_the_core_coarse_selection_in_model_space(nodes):
    latent = _latent(3, 4, 12, 10)
    latent["batch_index"] = [4, 1, 9]
    got = nodes.ImmiscibleNoise.execute(seed=7, k=16, coarse=3).args[0].generate_noise(latent)
    want = immiscible.select_noise(latent["samples"] * 0.18215, 16, seed=7, backend="torch", sample_ids=[4, 1, 9],
                                   coarse=3)
    assert torch.equal(got, want)
    assert not torch.equal(got, cn.Noise_Immiscible(7, 16).generate_noise(latent))
    with pytest.raises(ValueError, match=r"coarse must be in \[0, 10\]"):
        cn.Noise_Immiscible(7, 16, coarse=11).generate_noise(latent)


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k must be"), ({"k": 2, "mode": "nope"}, "mode"),
                                           ({"k": 2, "metric": "l1"}, "metric"), ({"k": 2, "coarse": -1}, "coarse"),
                                           ({"k": 2, "coarse": immiscible.COARSE_MAX + 1}, "coarse"),
                                           ({"k": 2, "latent_format": "sd9"}, "latent_format must be one of")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cn.Noise_Immiscible(0, **kwargs)


@pytest.mark.parametrize("node", ["ImmiscibleNoise", "ImmiscibleNoisePreview"])
def test_validate_inputs_checks_the_dropdowns_at_queue_time(nodes, node):
    """ComfyUI does not check a V3 Combo's value; the nodes' validate_inputs does, with the core's vocabulary."""
    validate = getattr(nodes, node).validate_inputs
    assert validate(mode="assign", metric="cosine", latent_format="wan") is True
    assert validate() is True and validate(mode=None, metric=None, latent_format=None) is True  # linked inputs
    assert validate(mode="nope") == "mode must be one of 'knn', 'assign', got 'nope'"
    assert validate(metric="l1") == "metric must be one of 'l2', 'cosine', got 'l1'"
    msg = validate(latent_format="sd9")
    assert msg.startswith("latent_format must be one of 'auto', 'sd15', 'sdxl', 'sd3', 'flux', 'wan', 'raw'")
    assert msg.endswith("got 'sd9'")
    assert "'knn'" in validate(mode=3) and list(immiscible.MODES) == ["knn", "assign"]


_FORMATS_EXPECT = "sd15 4, sdxl 4, sd3 16, flux 16, wan 16 (5-D video), raw any"


@pytest.mark.parametrize("shape, fmt, match", [
    ((1, 16, 8, 8), "sd15", "latent_format 'sd15' expects 4-channel latents, but the latent has 16 channels"),
    ((2, 4, 8, 8), "flux", "latent_format 'flux' expects 16-channel latents, but the latent has 4 channels"),
    ((1, 4, 2, 8, 8), "sdxl", None),                       # 5-D of the right channels: works (middle frame)
    ((1, 16, 8, 8), "wan", r"latent_format 'wan' expects 5-D video latents \[B, C, T, H, W\]"),
    ((1, 7, 8, 8), "raw", None),
])
def test_latent_format_must_fit_the_latent(shape, fmt, match):
    """A latent the chosen format does not take fails before any work, naming latent_format and the channels
    each format expects (it failed in the sheet's rgb_factors, or a 4-D latent for 'wan' gave a wrong shape)."""
    latent = _latent(*shape)
    if match is None:
        assert cn.preview(latent, 4, "knn", "l2", 0, 0.5, latent_format=fmt).data.latents.shape == shape
        assert cn.Noise_Immiscible(0, 4, latent_format=fmt).generate_noise(latent).shape == shape
        return
    for run in (lambda: cn.preview(latent, 4, "knn", "l2", 0, 0.5, latent_format=fmt),
                lambda: cn.Noise_Immiscible(0, 4, latent_format=fmt).generate_noise(latent)):
        with pytest.raises(ValueError, match=match) as err:
            run()
        assert f"channels per latent_format: {_FORMATS_EXPECT}, auto by shape" in str(err.value)
    # an all-zero latent still gets RandomNoise's noise from Immiscible Noise, whatever the format (unchanged)
    zeros = {"samples": torch.zeros(shape)}
    assert torch.equal(cn.Noise_Immiscible(3, 4, latent_format=fmt).generate_noise(zeros),
                       cn.comfy_random_noise(zeros["samples"], 3))


def test_model_latent_format_must_fit_the_latent():
    with pytest.raises(ValueError, match=r"the model's latent format \(_FakeFormat\) expects 16-channel latents, "
                                         r"but the latent has 4 channels"):
        cn.preview(_latent(1, 4, 8, 8), 4, "knn", "l2", 0, 0.5, model=_FakeModel())
    with pytest.raises(ValueError, match="the latent does not belong to this model"):
        cn.Noise_Immiscible(0, 4, model=_FakeModel()).generate_noise(_latent(1, 4, 8, 8))


def test_preview_refuses_other_than_4d_or_5d_before_any_work(monkeypatch):
    """A 3-D latent (audio) failed in the sheet after the selection ran; Immiscible Noise itself takes it."""
    monkeypatch.setattr(cn, "select", lambda *a, **k: pytest.fail("selection ran"))
    with pytest.raises(ValueError, match=r"the preview shows image latents .* latent has shape \(2, 4, 16\)"):
        cn.preview(_latent(2, 4, 16), 4, "knn", "l2", 0, 0.5)
    monkeypatch.undo()
    assert cn.Noise_Immiscible(0, 4).generate_noise(_latent(2, 4, 16)).shape == (2, 4, 16)


def test_bad_latents_and_t_raise():
    with pytest.raises(ValueError, match="empty"):
        cn.Noise_Immiscible(0, 4).generate_noise({"samples": torch.zeros(0, 4, 8, 8)})
    with pytest.raises(TypeError, match="LATENT"):
        cn.Noise_Immiscible(0, 4).generate_noise(torch.zeros(1, 4, 8, 8))
    for t in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError, match="t "):
            cn.preview(_latent(1, 4, 8, 8), 4, "knn", "l2", 0, t)
    with pytest.raises(ValueError, match="latent_format"):
        cn.preview(_latent(1, 4, 8, 8), 4, "knn", "l2", 0, 0.5, latent_format="sd9")


# --------------------------------------------------------------------------- the preview


class _FakeFormat:
    latent_channels, latent_dimensions = 16, 2  # as ComfyUI's latent formats declare them
    latent_rgb_factors = [[0.3, 0.2, 0.1]] * 16
    latent_rgb_factors_bias = [0.0, 0.0, 0.0]

    def process_in(self, x):
        return (x - 0.1) * 0.5

    def process_out(self, x):
        return x / 0.5 + 0.1


class CONST:  # the name ComfyUI's flow model_sampling classes derive from
    sigma_max = 1.0

    def percent_to_sigma(self, percent):
        return 1.0 - percent


class _FakeModel:
    def get_model_object(self, name):
        return {"latent_format": _FakeFormat(), "model_sampling": CONST()}[name]


def test_preview_node_outputs(nodes):
    latent = _latent(2, 4, 8, 8)
    latent["batch_index"] = [0, 1]
    out = nodes.ImmiscibleNoisePreview.execute(latent=latent, k=16, mode="knn", metric="l2", seed=4, t=0.5).args
    sheet, assigned, rand, noisy_a, noisy_r, stats = out
    assert sheet.shape[0] == 1 and sheet.shape[-1] == 3 and sheet.dtype == torch.float32
    assert 0.0 <= float(sheet.min()) and float(sheet.max()) <= 1.0 and float(sheet.std()) > 0.05
    x = latent["samples"] * 0.18215
    # VAE space out: process_in of the output is the model-space noise
    assert torch.allclose(assigned["samples"] * 0.18215, cn.Noise_Immiscible(4, 16).generate_noise(latent),
                          atol=1e-5)
    assert torch.allclose(rand["samples"] * 0.18215, cn.comfy_random_noise(x, 4, [0, 1]), atol=1e-5)
    sigma = cn.sd_sigma(0.5)
    assert torch.allclose(noisy_r["samples"] * 0.18215, x + sigma * rand["samples"] * 0.18215, atol=1e-4)
    assert assigned["batch_index"] == [0, 1]
    assert "assigned" in stats and "k=16" in stats and "mixing=eps" in stats


def test_preview_with_model_uses_its_format_and_flow_mixing():
    latent = _latent(2, 16, 4, 4, 4)  # 5-D video latent
    res = cn.preview(latent, 8, "knn", "l2", 1, 0.25, model=_FakeModel())
    x = (latent["samples"] - 0.1) * 0.5
    assert torch.allclose(res.data.latents, x)
    expected = 0.25 * res.data.assigned_noise + 0.75 * x
    assert torch.allclose(res.data.noisy_assigned, expected, atol=1e-6)
    assert torch.allclose(res.latents["noisy_assigned"]["samples"], expected / 0.5 + 0.1, atol=1e-5)
    assert "mixing=flow" in res.text and res.sheet.dtype.name == "uint8"


def test_preview_reduction_is_positive_for_k_above_one():
    res = cn.preview(_latent(2, 4, 8, 8), 32, "knn", "l2", 0, 0.5)
    rows = viz.stats_rows(res.stats)
    assert rows[1]["reduction_vs_candidates"] > 0
    assert rows[1]["reduction_vs_candidates"] == pytest.approx(res.data.selection.reduction * 100, rel=1e-6)
    assert res.data.candidate_distances.shape == (2, 32)
    assert torch.equal(res.data.candidate_distances.argmin(1), res.data.chosen)


@pytest.mark.parametrize("mode, metric", [("knn", "l2"), ("knn", "cosine"), ("assign", "l2")])
def test_preview_scores_come_from_the_selection(monkeypatch, mode, metric):
    """The preview reads every candidate's score from SelectionInfo; nothing is regenerated or rescored."""
    latent = _latent(3, 4, 8, 8)
    latent["batch_index"] = [2, 0, 7]
    k = 6
    x = latent["samples"] * 0.18215
    seed = 3 if mode == "knn" else immiscible.derive_seed(3, 2, 0, 7)
    ids = [2, 0, 7] if mode == "knn" else None
    cands = immiscible.candidates(x, k, seed=seed, mode=mode, backend="torch", sample_ids=ids)
    cands = cands.flatten(2) if mode == "knn" else cands.flatten(1)[None].expand(3, -1, -1)
    direct = (cands - x.flatten(1)[:, None]).square().sum(2)
    direct_cos = torch.nn.functional.cosine_similarity(cands, x.flatten(1)[:, None], dim=2)

    def forbidden(*a, **kw):
        raise AssertionError("the preview must not regenerate candidates")

    monkeypatch.setattr(immiscible, "candidates", forbidden)
    stats_calls = []
    real_stats = viz.noise_stats
    monkeypatch.setattr(viz, "noise_stats", lambda *a: stats_calls.append(1) or real_stats(*a))
    res = cn.preview(latent, k, mode, metric, 3, 0.5)
    assert stats_calls == [1]  # the random noise only; the assigned noise's scores come from the selection
    assert torch.allclose(res.data.candidate_distances, direct, rtol=1e-4)
    assert torch.allclose(res.data.candidate_cosines, direct_cos, atol=1e-5)
    b = torch.arange(3)
    picked = cands[b, res.data.chosen]
    assert torch.allclose(res.data.assigned_noise.flatten(1), picked)
    st = res.stats.assigned
    flat_noise = res.data.assigned_noise.flatten(1)
    np.testing.assert_allclose(st["distance"], (flat_noise - x.flatten(1)).square().sum(1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(st["std"], flat_noise.std(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(res.stats.candidate_mean, direct.double().mean(1).numpy(), rtol=1e-4)


@pytest.mark.parametrize("mode", ["knn", "assign"])
def test_preview_shows_pooled_statistics_with_coarse(mode):
    latent = _latent(2, 4, 8, 8)
    res = cn.preview(latent, 16, mode, "l2", 2, 0.5, coarse=2)
    x = latent["samples"] * 0.18215
    pool = lambda t: torch.nn.functional.avg_pool2d(t.double(), 4).flatten(1)  # noqa: E731 - 8x8 -> 2x2
    cos = lambda a, b: torch.nn.functional.cosine_similarity(pool(a), pool(b), dim=1).numpy()  # noqa: E731
    np.testing.assert_allclose(res.stats.assigned["coarse_cosine"], cos(res.data.assigned_noise, x), atol=1e-5)
    np.testing.assert_allclose(res.stats.random["coarse_cosine"], cos(res.data.random_noise, x), atol=1e-5)
    rnd, asg = viz.stats_rows(res.stats)
    assert asg["coarse_cosine"] > rnd["coarse_cosine"] and asg["coarse_reduction_vs_candidates"] > 0
    assert asg["coarse_reduction_vs_candidates"] == pytest.approx(res.data.selection.coarse_reduction * 100, rel=1e-6)
    assert "coarse=2x2" in res.text and "cos 2x2" in res.text
    plain = cn.preview(latent, 16, mode, "l2", 2, 0.5)
    assert "coarse_cosine" not in viz.stats_rows(plain.stats)[1] and "cos 2x2" not in plain.text


def test_preview_histogram_ranks_in_the_pooled_space_under_coarse():
    """The chosen candidate is the pooled-space nearest under coarse knn: the histogram shows that space."""
    latent = _latent(3, 4, 8, 8)
    res = cn.preview(latent, 16, "knn", "l2", 2, 0.5, coarse=2)
    rel, rand, space = viz.ranking_distances(res.data, res.stats)
    chosen = res.data.chosen.long().numpy()
    assert space == "pooled 2x2" and rel.shape == (3, 16) and rand.shape == (3,)
    np.testing.assert_allclose(rel[np.arange(3), chosen], rel.min(1))
    full, _, full_space = viz.ranking_distances(res.data, viz.PreviewStats(**{**res.stats.__dict__, "coarse": None}))
    assert full_space == "full" and not np.allclose(full, rel)
    plain = cn.preview(latent, 16, "knn", "l2", 2, 0.5)
    rel, _, space = viz.ranking_distances(plain.data, plain.stats)
    assert space == "full"
    np.testing.assert_allclose(rel[np.arange(3), plain.data.chosen.long().numpy()], rel.min(1))


def test_preview_of_all_zero_latent_is_random_noise():
    res = cn.preview({"samples": torch.zeros(2, 4, 8, 8)}, 16, "knn", "l2", 5, 0.5)
    assert torch.equal(res.data.assigned_noise, res.data.random_noise)
    rnd, asg = viz.stats_rows(res.stats)
    assert rnd == {**asg, "noise": "random"} and asg["reduction_vs_random"] == 0.0
    assert "all-zero latent" in res.text


def test_auto_formats():
    assert cn.auto_format(torch.zeros(1, 4, 8, 8)) == "sd15"
    assert cn.auto_format(torch.zeros(1, 16, 8, 8)) == "flux"
    assert cn.auto_format(torch.zeros(1, 16, 2, 8, 8)) == "wan"
    assert cn.auto_format(torch.zeros(1, 3, 8, 8)) == "raw"
    assert cn.latent_space(torch.zeros(1, 16, 8, 8)).flow
    assert not cn.latent_space(torch.zeros(1, 4, 8, 8)).flow
    assert cn.sd_sigma(1.0) == pytest.approx(14.61, abs=0.02)


# --------------------------------------------------------------------------- example workflows


# the training workflow (Train LoRA (Immiscible)'s inputs are ComfyUI's own) is checked in test_comfy_train.py
@pytest.mark.parametrize("path", sorted(p for p in (REPO / "example_workflows").glob("*.json") if "train" not in p.name),
                         ids=lambda p: p.name)
def test_example_workflows_are_consistent(nodes, path):
    import json

    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    for lid, src, slot, dst, dst_slot, typ in wf["links"]:
        assert lid in by_id[src]["outputs"][slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["link"] == lid
        assert by_id[src]["outputs"][slot]["type"] == typ
    ours = {n.define_schema().node_id: n.define_schema() for n in nodes.NODES}
    used = [n for n in wf["nodes"] if n["type"] in ours]
    assert used
    for node in used:
        schema = ours[node["type"]]
        widgets = [p for p in schema.inputs
                   if p.__class__.__name__ != "_Port" or p.id in ("k", "seed", "t", "coarse")]
        expected = len(widgets) + 1  # + the seed's control_after_generate value
        assert len(node["widgets_values"]) == expected, node["type"]
        # Inputs added after a release go last, so a workflow saved before them keeps its values.
        assert widgets[-1].id == "coarse" and node["widgets_values"][-1] == 0
        sockets = {i["name"] for i in node["inputs"]}
        assert sockets <= {p.id for p in schema.inputs}
