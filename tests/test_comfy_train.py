"""Train LoRA (Immiscible) without ComfyUI: the scoped noise swap, the global generator, fallbacks, checks.

The fakes reproduce what ``comfy_extras/nodes_train.py`` (ComfyUI a125cd84) does with randomness:
``TrainSampler.sample`` looks ``Noise_RandomNoise`` up on the ``nodes_custom_sampler`` module each
step, whose ``generate_noise`` reseeds torch's global generator (``comfy.sample.prepare_noise``)
and draws the batch's noise from it; ``randperm`` picks the batch and ``rand`` the sigma, both
from the global generator; ``TrainLoraNode.train`` draws a dummy noise and the LoRA's
initialisation from it too. The real thing runs in ``tests/integration/test_comfyui_train.py``.
"""
from __future__ import annotations

import argparse
import logging
import types
from pathlib import Path

import pytest
import torch

import immiscible
from comfy_nodes import installer
from comfy_nodes.train_support import EXPECTED, checkout_support, training_support
from comfy_nodes.training import (SelectionNotApplied, TrainedLoRA, TrainingRun, check_settings,
                                  selected_training_noise, spec_problems)
from immiscible_host.options import Settings, settings_from_args, with_metadata
from immiscible_host.ranks import seed_from_draw

SHAPE = (3, 4, 8, 8)


class FakeNoise:
    """``Noise_RandomNoise``: ``prepare_noise`` reseeds the global generator and draws from it."""

    def __init__(self, seed):
        self.seed = seed

    def generate_noise(self, input_latent):
        latent = input_latent["samples"]
        return torch.randn(latent.size(), dtype=latent.dtype, generator=torch.manual_seed(self.seed))


def fake_comfy():
    """``(nodes_train, nodes_custom_sampler)`` as modules holding the fakes."""
    custom_sampler = types.SimpleNamespace(Noise_RandomNoise=FakeNoise)

    class FakeTrainSampler:
        def __init__(self, loss_fn, total_steps=1, seed=0, batch_size=2):
            self.loss_fn, self.total_steps, self.seed, self.batch_size = loss_fn, total_steps, seed, batch_size

        def sample(self, latents):
            trace = []
            for i in range(self.total_steps):
                noisegen = custom_sampler.Noise_RandomNoise(self.seed + i * 1000)
                idx = torch.randperm(latents.shape[0])[: self.batch_size]
                batch = latents[idx]
                noise = noisegen.generate_noise({"samples": batch})
                sigma = torch.rand((1,))
                self.loss_fn(noise, batch)
                trace.append((idx, batch, noise, sigma))
            return trace

    train = types.SimpleNamespace(TrainSampler=FakeTrainSampler)
    return train, custom_sampler


def train(train_module, custom_sampler, latents, seed=5, steps=4, loss_fn=lambda *a: None):
    """``TrainLoraNode.train`` as far as randomness goes: init draw, dummy noise, the sampler's loop."""
    init = torch.randn(16)  # the LoRA's initialisation (comfy/weight_adapter/lora.py) from the global generator
    dummy = custom_sampler.Noise_RandomNoise(seed)
    dummy_noise = dummy.generate_noise({"samples": latents})
    trace = train_module.TrainSampler(loss_fn, total_steps=steps, seed=seed).sample(latents)
    return {"init": init, "dummy": dummy, "dummy_noise": dummy_noise, "trace": trace,
            "after": torch.get_rng_state(), "next": torch.randn(8)}


def run_arm(k=1, mode="knn", coarse=0, seed=5, steps=4, latents=None, loss_fn=lambda *a: None):
    """Stock (k None) or Immiscible training of the fakes from the same global generator state."""
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 3 if latents is None else latents
    train_module, custom_sampler = fake_comfy()
    torch.manual_seed(1234)
    if k is None:
        return train(train_module, custom_sampler, latents, seed, steps, loss_fn), None
    run = TrainingRun(check_settings(k, mode, "l2", coarse))
    with selected_training_noise(train_module, custom_sampler, run):
        out = train(train_module, custom_sampler, latents, seed, steps, loss_fn)
    return out, run


def test_k1_is_stock_bit_for_bit_and_the_generator_ends_where_stock_leaves_it():
    stock, _ = run_arm(None)
    one, run = run_arm(1)
    for (i0, _, n0, s0), (i1, _, n1, s1) in zip(stock["trace"], one["trace"]):
        assert torch.equal(i0, i1) and torch.equal(n0, n1) and torch.equal(s0, s1)
    assert torch.equal(stock["after"], one["after"]) and torch.equal(stock["next"], one["next"])
    assert run.metadata() == {} and "stock noise" in run.summary(4, 1) and run.selected == 0
    # the k = 1 statistic: cosine(stock noise, latent), which varies (so Plot Loss Graph can draw it)
    expected = [float(torch.nn.functional.cosine_similarity(n.reshape(len(n), -1), b.reshape(len(b), -1)).mean())
                for _, b, n, _ in stock["trace"]]
    assert run.stats == pytest.approx(expected) and len(set(run.stats)) == 4 and run.statistic.startswith("cosine")


@pytest.mark.parametrize("mode, coarse", [("knn", 0), ("assign", 0), ("knn", 4)])
def test_selection_keeps_batches_sigmas_and_the_generator_stock(mode, coarse):
    stock, _ = run_arm(None)
    sel, run = run_arm(8, mode=mode, coarse=coarse)
    assert torch.equal(stock["init"], sel["init"])
    for (i0, batch, n0, s0), (i1, _, n1, s1) in zip(stock["trace"], sel["trace"]):
        assert torch.equal(i0, i1) and torch.equal(s0, s1)  # the same batches and sigmas
        assert not torch.equal(n0, n1)
        # the independent reference: the core's selection, seeded from the step's stock draw
        expected = immiscible.select_noise(batch, 8, seed=seed_from_draw(n0), mode=mode, coarse=coarse or None)
        assert torch.equal(n1, expected)
    assert torch.equal(stock["after"], sel["after"]) and torch.equal(stock["next"], sel["next"])
    assert len(run.stats) == 4 and run.selected == 4 and run.stock_steps == []
    if coarse:
        assert run.statistic == "pooled cosine"
    else:
        assert all(0.0 < r < 1.0 for r in run.stats) and run.statistic == "reduction"


def test_the_same_inputs_reproduce_the_same_noise():
    a, _ = run_arm(8)
    b, _ = run_arm(8)
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a["trace"], b["trace"]))


def test_only_the_training_loop_sees_the_selection_and_every_exit_restores_stock():
    train_module, custom_sampler = fake_comfy()
    stock_sampler = train_module.TrainSampler
    latents = torch.randn(SHAPE)
    run = TrainingRun(Settings(k=8))
    with selected_training_noise(train_module, custom_sampler, run):
        out = train(train_module, custom_sampler, latents)
        assert custom_sampler.Noise_RandomNoise is FakeNoise  # outside TrainSampler.sample: stock
    assert type(out["dummy"]) is FakeNoise
    assert train_module.TrainSampler is stock_sampler and custom_sampler.Noise_RandomNoise is FakeNoise

    def failing_loss(*args):
        raise KeyboardInterrupt  # an interrupted prompt

    run = TrainingRun(Settings(k=8))
    with pytest.raises(KeyboardInterrupt), selected_training_noise(train_module, custom_sampler, run):
        train(train_module, custom_sampler, latents, loss_fn=failing_loss)
    assert train_module.TrainSampler is stock_sampler and custom_sampler.Noise_RandomNoise is FakeNoise


def test_a_later_failure_warns_once_uses_stock_noise_and_is_counted(monkeypatch, caplog):
    stock, _ = run_arm(None)
    real = immiscible.select_noise
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) in (2, 3):
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(immiscible, "select_noise", flaky)
    with caplog.at_level(logging.WARNING):
        sel, run = run_arm(8)
    assert run.stock_steps == [1, 2] and run.stats[1] == run.stats[2] == 0.0 and run.selected == 2
    assert torch.equal(sel["trace"][1][2], stock["trace"][1][2])  # a fallback step is exactly the stock draw
    assert sum("device lost" in r.getMessage() for r in caplog.records) == 1
    assert "stock steps 2 (at [1, 2])" in run.summary(4, 1)
    assert run.metadata()["ss_immiscible_stock_batches"] == "2"
    assert run.selection_map() == {"loss": run.stats, "statistic": "reduction", "stock_steps": [1, 2]}
    assert torch.equal(stock["after"], sel["after"])


def test_a_first_step_that_cannot_be_selected_stops_before_training(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(immiscible, "select_noise", broken)
    losses = []
    with pytest.raises(SelectionNotApplied, match="first training step.*no kernel"):
        run_arm(8, loss_fn=lambda *a: losses.append(1))
    assert losses == []


def test_a_sampler_that_draws_its_noise_another_way_is_refused_before_its_first_loss():
    train_module, custom_sampler = fake_comfy()

    class Elsewhere(train_module.TrainSampler):
        def sample(self, latents):
            self.loss_fn(torch.randn_like(latents), latents)

    train_module.TrainSampler = Elsewhere
    with pytest.raises(SelectionNotApplied, match="did not go through the selection"):
        with selected_training_noise(train_module, custom_sampler, TrainingRun(Settings(k=4))):
            train(train_module, custom_sampler, torch.randn(SHAPE))
    with selected_training_noise(train_module, custom_sampler, TrainingRun(Settings(k=1))):
        train(train_module, custom_sampler, torch.randn(SHAPE))  # k = 1 asks for nothing


def test_metadata_are_the_sd_scripts_keys():
    run = TrainingRun(check_settings(8, "assign", "cosine", 4))
    # what the sd-scripts adapter writes for the same options given on its command line
    args = argparse.Namespace(immiscible_k=8, immiscible_mode="assign", immiscible_metric="cosine", immiscible_coarse=4)
    assert run.metadata() == with_metadata({}, settings_from_args(args), stock_batches=0)
    assert {"ss_immiscible_k": "8", "ss_immiscible_mode": "assign", "ss_immiscible_metric": "cosine",
            "ss_immiscible_coarse": "4", "ss_immiscible_stock_batches": "0"}.items() <= run.metadata().items()
    lora = TrainedLoRA({"a.lora_up.weight": torch.zeros(2)}, run.metadata())
    assert isinstance(lora, dict) and list(lora) == ["a.lora_up.weight"] and lora.metadata["ss_immiscible_k"] == "8"


@pytest.mark.parametrize("inputs, needle", [
    ({"k": 0}, "k must be in [1, 65536]"), ({"k": 70000}, "k must be in [1, 65536]"),
    ({"k": 2.5}, "k must be an integer"), ({"mode": "nearest"}, "mode"), ({"metric": "l1"}, "metric"),
    ({"coarse": -1}, "coarse must be in [0, 1024]"),
])
def test_bad_node_inputs_name_the_input_and_its_range(inputs, needle):
    values = {"k": 8, "mode": "knn", "metric": "l2", "coarse": 0, **inputs}
    with pytest.raises((TypeError, ValueError), match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_settings(values["k"], values["mode"], values["metric"], values["coarse"])


def test_stock_inputs_are_checked_against_their_spec():
    spec = {"required": {"steps": ("INT", {"min": 1, "max": 100}), "lr": ("FLOAT", {"min": 1e-7, "max": 1.0}),
                         "optimizer": (["AdamW", "SGD"], {"default": "AdamW"}), "model": ("MODEL", {})},
            "optional": {"existing": ([f"l{i}" for i in range(30)], {})}}
    assert spec_problems(spec, {"steps": 5, "lr": 0.1, "optimizer": "SGD", "model": None}) == []
    problems = spec_problems(spec, {"steps": 0, "lr": 2.0, "optimizer": "Lion", "existing": "x"})
    assert problems == ["steps must be in [1, 100], got 0", "lr must be in [1e-07, 1.0], got 2.0",
                        "optimizer must be one of ['AdamW', 'SGD'], got 'Lion'",
                        "existing must be one of one of 30 choices, got 'x'"]


def test_support_names_what_is_missing_and_the_version():
    source = "\n".join(needle for needle, _ in EXPECTED)
    assert training_support(source, "v0.3.64") is None
    why = training_support(source.replace("Noise_RandomNoise(", "Noise_Other("), "v0.9.0")
    assert "v0.9.0" in why and "Noise_RandomNoise" in why and "refuses" in why
    assert "has no comfy_extras/nodes_train.py" in training_support(None, "v0.3.20")


def test_install_check_says_whether_training_is_supported(tmp_path: Path):
    (tmp_path / "comfy_extras").mkdir()
    (tmp_path / "comfyui_version.py").write_text('__version__ = "0.3.64"\n')
    assert "has no comfy_extras/nodes_train.py" in installer.training_line(tmp_path)
    (tmp_path / "comfy_extras" / "nodes_train.py").write_text("\n".join(needle for needle, _ in EXPECTED))
    assert checkout_support(tmp_path) is None
    assert installer.training_line(tmp_path) == \
        "training: Train LoRA (Immiscible) is supported (ComfyUI v0.3.64)"


def test_the_example_workflow_is_wired_consistently():
    import json

    path = Path(__file__).resolve().parent.parent / "example_workflows" / "immiscible_train_lora.json"
    wf = json.loads(path.read_text())
    by_id = {n["id"]: n for n in wf["nodes"]}
    for lid, src, slot, dst, dst_slot, typ in wf["links"]:
        assert lid in by_id[src]["outputs"][slot]["links"] and by_id[src]["outputs"][slot]["type"] == typ
        assert by_id[dst]["inputs"][dst_slot]["link"] == lid
    train = next(n for n in wf["nodes"] if n["type"] == "TrainLoraImmiscible")
    assert train["widgets_values"][-4:] == [8, "knn", "l2", 0]  # k, mode, metric, coarse: last, after the stock inputs
    assert {n["type"] for n in wf["nodes"]} >= {"SaveLoraImmiscible", "LossGraphNode"}
