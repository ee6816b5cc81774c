"""What only the sd-scripts adapter does, on the fake ``library`` of tests/helpers.py (no sd-scripts needed).

What both adapters share (options, config file, k = 1 bit-identical, selection, fallback, the
first-step guard, metadata, trackers) is in tests/test_adapters.py. Here: the SD noise function's
first draw (upstream's body verbatim, train_util.py:6071 at 48d368fa) with upstream's noise
options around it, validation passes, the flow helpers' in-place overwrite, train_control_net's
inline draw, forks' own noise selections, version names and ``install.py --check`` per trainer.
tests/integration/test_sd_scripts.py repeats the mechanism on the real code.
"""
from __future__ import annotations

import argparse
import importlib
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import immiscible
from helpers import DDPMScheduler, fake_host, nan_latents, selected_noise
from immiscible_host import adapter as adapter_module
from immiscible_host import installer
from immiscible_host import options as host_options
from immiscible_host.hook import MARK
from immiscible_host.ranks import seed_from_draw
from immiscible_host.runtime import SelectionNotApplied
from kohya_patch import host

NOISE = "get_noise_noisy_latents_and_timesteps"
SD3 = "sd3_train_utils.get_noisy_model_input_and_timesteps"


@pytest.fixture
def sd(tmp_path, monkeypatch):
    """The fake sd-scripts imported through kohya_patch's hook; the trainer is train_network.py."""
    with fake_host("sd-scripts", tmp_path, monkeypatch) as h:
        yield h


#: upstream's noise options around the base draw (noise offset, multires, input perturbation)
EXTRAS = {
    "plain": (),
    "offset-adaptive": ("--noise_offset", "0.1", "--adaptive_noise_scale", "0.01"),
    "multires": ("--multires_noise_iterations", "3"),
    "ip-gamma": ("--ip_noise_gamma", "0.1"),
    "random-strengths": ("--noise_offset", "0.1", "--noise_offset_random_strength", "--ip_noise_gamma", "0.1",
                         "--ip_noise_gamma_random_strength"),
}


# --------------------------------------------------------------------------- the SD noise function's first draw


@pytest.mark.parametrize("extra", list(EXTRAS.values()), ids=list(EXTRAS))
def test_k1_with_upstreams_noise_options_is_bit_identical(sd, extra):
    args = sd.parse("--immiscible_k", "1", *extra)
    latents = sd.latents
    got = sd.noise_call(args, latents)
    after = torch.get_rng_state(), random.getstate()
    want = sd.noise_call(args, latents, fn=sd.mods["train_util"].get_noise_noisy_latents_and_timesteps.__wrapped__)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(after[0], torch.get_rng_state()) and after[1] == random.getstate()


@pytest.mark.parametrize("extra", [v for k, v in EXTRAS.items() if k != "random-strengths"],
                         ids=[k for k in EXTRAS if k != "random-strengths"])
def test_selection_replaces_only_the_base_draw(sd, extra):
    args = sd.parse("--immiscible_k", "8", *extra)
    latents, ctf = sd.latents, sd.mods["custom"]
    original = torch.randn_like
    noise, noisy, t = sd.noise_call(args, latents)
    assert torch.randn_like is original  # swapped only while the noise function runs
    # the same random streams, by hand: the stock base draw seeds the selection, then upstream's own steps
    torch.manual_seed(0)
    random.seed(0)
    want = immiscible.select_noise(latents, 8, seed=seed_from_draw(torch.randn_like(latents)))
    if args.noise_offset:
        want = ctf.apply_noise_offset(latents, want, args.noise_offset, args.adaptive_noise_scale)
    if args.multires_noise_iterations:
        want = ctf.pyramid_noise_like(want, "cpu", args.multires_noise_iterations, args.multires_noise_discount)
    want_t = sd.mods["train_util"].get_timesteps(0, 1000, 2, "cpu")
    eps = want + 0.1 * torch.randn_like(latents) if args.ip_noise_gamma else want
    assert torch.equal(noise, want) and torch.equal(t, want_t)
    assert torch.equal(noisy, DDPMScheduler().add_noise(latents, eps, t))
    assert sd.runtime.calls == 1


def test_a_noise_function_that_no_longer_draws_randn_like_of_latents_stops_the_run(sd):
    """The needle is still in the source but the base draw is made another way: not fired."""
    drifted = sd.files["library/train_util.py"].replace(
        "noise = torch.randn_like(latents, device=latents.device)",
        "noise = torch.randn_like(latents.contiguous().clone())  # randn_like(latents")
    sd.build(files={"library/train_util.py": drifted})
    assert sd.runtime.points[f"train_util.{NOISE}"].ok  # the static check passes
    args = sd.parse("--immiscible_k", "8")
    acc = sd.accelerator()
    with pytest.raises(SelectionNotApplied, match="no longer draws its noise with torch.randn_like"):
        sd.step(args, acc=acc)
    assert acc.steps == 0 and sd.runtime.stock_reasons == {f"not-fired:train_util.{NOISE}": 1}


def test_validation_passes_keep_stock_noise(sd):
    tu = sd.mods["train_util"]

    def process_batch(args, is_train):  # sd-scripts' trainers pass is_train down to the noise function
        return sd.noise_call(args, sd.latents)[0]

    args = sd.parse("--immiscible_k", "8")
    stock = sd.stock(args)[0]
    assert torch.equal(process_batch(args, is_train=False), stock)
    assert not torch.equal(process_batch(args, is_train=True), stock)
    assert sd.runtime.calls == 1 and sd.runtime.stock_batches == 0  # a validation draw is not a fallback
    args = sd.parse("--immiscible_k", "8", "--immiscible_validation")
    assert torch.equal(process_batch(args, is_train=False), selected_noise(sd.latents, 8, seed=0))
    assert tu.get_sai_model_spec(None, args, False, True, False)["ss_immiscible_validation"] == "True"


def test_metadata_follows_the_calls_own_no_metadata(sd):
    """get_sai_model_spec takes the run's args: its own --no_metadata counts, not the one at start-up."""
    args = sd.parse("--immiscible_k", "8")
    assert sd.metadata(args)["ss_immiscible_k"] == "8"
    args.no_metadata = True
    assert "ss_immiscible_k" not in sd.metadata(args)


# --------------------------------------------------------------------------- flow helpers


def test_flow_helper_overwrites_the_callers_noise_in_place(sd):
    flux = sd.mods["flux"]
    args = sd.parse("--immiscible_k", "4")
    latents = sd.latents
    torch.manual_seed(5)
    noise = torch.randn_like(latents)  # the trainer's own draw
    stock, buf = noise.clone(), noise.data_ptr()
    x, t, sigmas = flux.get_noisy_model_input_and_timesteps(args, None, latents, noise, "cpu", torch.float32)
    want = immiscible.select_noise(latents, 4, seed=seed_from_draw(stock))
    assert noise.data_ptr() == buf and torch.equal(noise, want)  # the caller's target uses this tensor
    assert torch.allclose(x, sigmas * want + (1 - sigmas) * latents)  # the input is built from it too
    torch.manual_seed(5)
    torch.randn_like(latents)
    assert torch.equal(t, torch.rand(2) * 1000)  # the helper's own timesteps: stock's
    assert sd.runtime.calls == 1


def test_a_flow_helper_given_noise_of_another_shape_keeps_it_and_counts_it(sd):
    flux = sd.mods["flux"]
    args = sd.parse("--immiscible_k", "8")
    sd.step(args)
    noise = torch.zeros(1, 4, 8, 8)
    flux.get_noisy_model_input_and_timesteps(args, None, sd.latents, noise, "cpu", torch.float32)
    sd.step(args, nan_latents(sd.latents))
    assert torch.equal(noise, torch.zeros(1, 4, 8, 8))
    assert sd.runtime.stock_batches == 2 and sd.runtime.calls == 1
    assert sd.runtime.stock_reasons == {"shape:flux_train_utils.get_noisy_model_input_and_timesteps": 1,
                                        "select:non-finite-latents": 1}


def test_a_broken_flow_point_is_reported_left_unwrapped_and_refused_when_needed(sd, capsys):
    sd.build(files={"library/sd3_train_utils.py": "def get_noisy_model_input_and_timesteps(args, latents, x, d, t):\n"
                                                  "    return x\n"})
    sd3 = importlib.import_module("library.sd3_train_utils")
    assert not getattr(sd3.get_noisy_model_input_and_timesteps, MARK, False)
    status = sd.runtime.points[SD3]
    assert status.state == "broken" and "noise" in status.detail
    sd.adapter.script = "sd3_train_network.py"
    with pytest.raises(SystemExit):
        sd.parse("--immiscible_k", "4")
    assert f"patch point {SD3} needed by sd3_train_network.py is unavailable: broken (parameters" in (
        capsys.readouterr().err)


# --------------------------------------------------------------------------- train_control_net.py (inline draw)


@pytest.mark.parametrize("script,module", [("train_control_net.py", "train_control_net"),
                                           ("train_controlnet.py", "__main__")])  # v0.8.7 / v0.9.1 name
def test_train_control_net_inline_noise(sd, tmp_path, monkeypatch, script, module):
    src = textwrap.dedent('''
        import torch
        def train(latents):
            noise = torch.randn_like(latents, device=latents.device)
            return noise
        def helper(latents):
            return torch.randn_like(latents)
    ''')
    path = tmp_path / script
    path.write_text(src)
    mod = {}
    exec(compile(src, str(path), "exec"), mod)
    sd.adapter.script = script
    monkeypatch.delitem(sys.modules, "train_control_net", raising=False)
    monkeypatch.setitem(sys.modules, module, type(sys)(module))
    sys.modules[module].train = mod["train"]
    sys.modules[module].__file__ = str(path)
    args = sd.parse("--immiscible_k", "8")
    assert sd.runtime.points["train_control_net.train (inline noise)"].ok
    torch.manual_seed(0)
    noise = mod["train"](sd.latents)
    assert torch.equal(noise, selected_noise(sd.latents, 8, seed=0))
    torch.manual_seed(0)
    other = mod["helper"](sd.latents)  # any other caller: stock
    torch.manual_seed(0)
    assert torch.equal(other, torch.randn_like.__immiscible_next__(sd.latents))
    assert sd.runtime.calls == 1 and args.immiscible_k == 8


def test_train_control_net_without_inline_draw_is_an_error_when_on(sd, monkeypatch, capsys):
    module = type(sys)("train_control_net")
    exec("import torch\ndef train(latents):\n    return torch.randn(latents.shape)\n", module.__dict__)
    sd.adapter.script = "train_control_net.py"
    monkeypatch.setitem(sys.modules, "train_control_net", module)
    original = torch.randn_like
    with pytest.raises(SystemExit):
        sd.parse("--immiscible_k", "8")
    assert "train_control_net.train (inline noise) needed by train_control_net.py" in capsys.readouterr().err
    assert torch.randn_like is original  # nothing intercepted
    sd.parse()  # off: carries on


# --------------------------------------------------------------------------- forks' own noise selections


@pytest.mark.parametrize("fork_args,conflict", [
    ({"knn_noise_k": 1}, False),                                   # upstream PR #2374: 1 = off
    ({"knn_noise_k": 4}, True),
    ({"knn_noise_k": 0}, False),                                   # Anima-Standalone-Trainer: 0 = off
    ({"knn_noise_k": 16}, True),
    ({"noise_selection": "gaussian", "knn_noise_k": 8}, False),    # gesen2egee/sd-scripts: gaussian = off
    ({"noise_selection": "knn", "knn_noise_k": 8}, True),
    ({"noise_selection": "knn"}, True),
    ({}, False),
])
def test_forks_own_selection_conflicts_only_when_on(fork_args, conflict):
    ns = argparse.Namespace(**fork_args)
    host.check_upstream_overlap(ns, host_options.Settings(k=1))  # pack off: never a conflict
    if not conflict:
        host.check_upstream_overlap(ns, host_options.Settings(k=8))
        return
    with pytest.raises(ValueError) as info:
        host.check_upstream_overlap(ns, host_options.Settings(k=8))
    msg = str(info.value)
    assert "--immiscible_k 8" in msg
    assert ("--noise_selection knn" in msg) if "noise_selection" in fork_args else (f"--knn_noise_k {ns.knn_noise_k}"
                                                                                     in msg)


def test_a_fork_conflict_stops_the_start_up(sd):
    args = sd.parse("--immiscible_k", "8")
    args.knn_noise_k = 4
    with pytest.raises(ValueError, match="--knn_noise_k 4"):
        sd.start_up_point(args)
    args.noise_selection, args.knn_noise_k = "knn", 8
    with pytest.raises(ValueError, match="--noise_selection knn"):
        sd.start_up_point(args)
    args.noise_selection = "gaussian"
    sd.start_up_point(args)


# --------------------------------------------------------------------------- version and install.py --check


def test_version_of_a_git_checkout_a_known_tree_and_an_unknown_one(tmp_path):
    root = tmp_path / "sd"
    (root / "library").mkdir(parents=True)
    (root / "library" / "train_util.py").write_text("x = 1\n")
    assert host.HOST.describe(root).startswith("unknown")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    subprocess.run([*git, "tag", "v0.8.7"], check=True)
    adapter_module._describe.cache_clear()
    assert host.HOST.describe(root).startswith("v0.8.7 (commit ")
    other = tmp_path / "other"
    (other / "library").mkdir(parents=True)
    (other / "library" / "train_util.py").write_text("x = 2\n")
    fp = host.HOST.fingerprint(other)
    assert fp and host.HOST.fingerprint(other) == fp
    host.KNOWN[fp] = "v9.9.9 (test)"
    try:
        assert host.HOST.describe(other).startswith("v9.9.9 (test), identified by its library files")
    finally:
        del host.KNOWN[fp]
        adapter_module._describe.cache_clear()


def test_check_lists_every_shipped_trainer_and_fails_only_for_a_needed_broken_point(tmp_path):
    from test_kohya_install import fake_sd_scripts

    root = fake_sd_scripts(tmp_path)
    for script in ("train_network.py", "sd3_train.py", "my_new_train.py"):
        (root / script).write_text("")
    rows = dict(installer.patch_point_report(host.HOST, root))
    trainers = {s: (what, problem) for s, what, problem in installer.trainer_report(host.HOST, root, rows)}
    assert trainers["train_network.py"] == ("selects through train_util.get_noise_noisy_latents_and_timesteps", False)
    assert trainers["sd3_train.py"][1] and "refuses --immiscible_k > 1" in trainers["sd3_train.py"][0]
    assert "not a trainer this pack knows" in trainers["my_new_train.py"][0]
    assert trainers["train_control_net.py"][1] is False
