"""Never train on stock noise while the user asked for selection (issue 9), on the fake sd-scripts.

- the first ``Accelerator.backward`` of a ``k > 1`` run stops it when its first draw was not
  selected, naming the script, the sd-scripts version and what to do;
- later fallbacks are counted: ``ss_immiscible_stock_batches`` and ``immiscible/stock_batches``;
- the version string (git, a tested version's fingerprint, or "unknown");
- forks' own noise selections conflict with ``--immiscible_k > 1`` only when switched on.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest
import torch
from test_kohya_patch import FAKE_ACCELERATE, FAKE_CUSTOM, FAKE_FLUX, FAKE_TRAIN_UTIL, LATENTS, call, make_args

from immiscible_host import adapter as adapter_module
from immiscible_host import installer
from immiscible_host import options as host_options
from immiscible_host.runtime import SelectionNotApplied
from kohya_patch import host
from kohya_patch.host import ADAPTER

RUNTIME = ADAPTER.runtime



def _purge():
    for name in [m for m in sys.modules if m.split(".")[0] in ("library", "accelerate")]:
        del sys.modules[name]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake ``library`` plus a fake ``accelerate``, imported through the hook; the script is
    train_network.py. ``noise_body`` lets a test drift the SD noise function."""

    def build(train_util=FAKE_TRAIN_UTIL):
        pkg = tmp_path / "library"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "train_util.py").write_text(train_util)
        (pkg / "custom_train_functions.py").write_text(FAKE_CUSTOM)
        (pkg / "flux_train_utils.py").write_text(FAKE_FLUX)
        acc = tmp_path / "accelerate"
        acc.mkdir(exist_ok=True)
        (acc / "__init__.py").write_text(FAKE_ACCELERATE)
        _purge()
        importlib.invalidate_caches()
        ADAPTER.hook.install()
        tu = importlib.import_module("library.train_util")
        return tu, importlib.import_module("accelerate")

    saved_modules = {m: sys.modules[m] for m in list(sys.modules) if m.split(".")[0] in ("library", "accelerate")}
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ADAPTER, "script", "train_network.py")
    RUNTIME.reset()
    RUNTIME.points.clear()
    try:
        yield build
    finally:
        ADAPTER.hook.uninstall()
        RUNTIME.reset()
        RUNTIME.points.clear()
        _purge()
        sys.modules.update(saved_modules)


def _step(tu, accelerate, args, latents=LATENTS):
    """One training step: the trainer's noise call, then accelerator.backward (before the optimizer)."""
    acc = accelerate.Accelerator()
    call(tu.get_noise_noisy_latents_and_timesteps, args, latents)
    acc.backward(torch.zeros(()))
    return acc


def test_backward_is_patched_and_a_selected_run_trains_on(fake):
    tu, accelerate = fake()
    assert RUNTIME.points["accelerate.Accelerator.backward"].ok
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    acc = _step(tu, accelerate, args)
    acc.backward(torch.zeros(()))
    assert acc.steps == 2 and RUNTIME.calls == 1 and RUNTIME.stock_batches == 0


@pytest.mark.parametrize("k", [None, 1])
def test_off_never_stops_and_touches_nothing(fake, k):
    tu, accelerate = fake()
    args = make_args() if k is None else make_args(immiscible_k=k)
    ADAPTER.start_up(args)
    acc = accelerate.Accelerator()
    acc.backward(torch.zeros(()))  # no draw at all: fine when off
    assert acc.steps == 1 and RUNTIME.calls == 0


def test_a_trainer_whose_noise_bypasses_every_point_stops_before_its_first_step(fake):
    """An unknown trainer (or a known one drawing its noise some new way): no draw was selected."""
    tu, accelerate = fake()
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    acc = accelerate.Accelerator()
    torch.randn_like(LATENTS)  # drawn inline, not through any patch point
    with pytest.raises(SelectionNotApplied) as info:
        acc.backward(torch.zeros(()))
    msg = str(info.value)
    assert acc.steps == 0
    assert "--immiscible_k 8" in msg and "train_network.py" in msg and "does not intercept" in msg
    assert "(version unknown" in msg or "(version " in msg
    assert "install.py --check" in msg and "open an issue" in msg


def test_a_noise_function_that_no_longer_draws_randn_like_of_latents_stops_the_run(fake):
    """The needle is still in the source but the base draw is made another way: not fired."""
    drifted = FAKE_TRAIN_UTIL.replace("noise = torch.randn_like(latents, device=latents.device)",
                                      "noise = torch.randn_like(latents.contiguous().clone())  # randn_like(latents")
    tu, accelerate = fake(drifted)
    assert RUNTIME.points["train_util.get_noise_noisy_latents_and_timesteps"].ok  # the static check passes
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    with pytest.raises(SelectionNotApplied, match="no longer draws its noise with torch.randn_like"):
        _step(tu, accelerate, args)


def test_a_first_draw_that_fell_back_stops_the_run(fake):
    tu, accelerate = fake()
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    bad = LATENTS.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(SelectionNotApplied, match="NaN or infinite values.*data or VAE problem"):
        _step(tu, accelerate, args, bad)


def test_later_fallbacks_are_counted_in_metadata_and_trackers(fake):
    tu, accelerate = fake()
    args = make_args(immiscible_k=8)
    ADAPTER.start_up(args)
    acc = _step(tu, accelerate, args)
    logged = []

    class Tracker:
        def log(self, values, step=None):
            logged.append(dict(values))

    acc.trackers = [Tracker()]
    acc.init_trackers("run")
    bad = LATENTS.clone()
    bad[0, 0, 0, 0] = float("nan")
    for _ in range(3):  # e.g. a kernel error at step 5000: warn once, stock noise, counted
        call(tu.get_noise_noisy_latents_and_timesteps, args, bad)
        acc.backward(torch.zeros(()))
        acc.trackers[0].log({"loss/current": 1.0}, step=1)
    assert acc.steps == 4 and RUNTIME.stock_batches == 3
    assert [v["immiscible/stock_batches"] for v in logged] == [1, 2, 3]
    spec = tu.get_sai_model_spec(None, args, False, True, False)
    assert spec["ss_immiscible_stock_batches"] == "3" and spec["ss_immiscible_k"] == "8"


def test_a_missing_point_error_names_the_version_and_what_to_do(fake, monkeypatch):
    fake()
    monkeypatch.setattr(ADAPTER, "script", "sd3_train_network.py")
    with pytest.raises(ValueError) as info:
        ADAPTER.start_up(make_args(immiscible_k=8))
    msg = str(info.value)
    assert "sd3_train_utils.get_noisy_model_input_and_timesteps" in msg and "sd-scripts version:" in msg
    assert "install.py --check" in msg


# --------------------------------------------------------------------------- version


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


def test_the_advice_names_the_check_command():
    assert "install.py --check --sd-scripts" in ADAPTER.advice() and sys.executable in ADAPTER.advice()


# --------------------------------------------------------------------------- forks' own selections


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


def test_a_fork_conflict_stops_the_start_up(fake):
    fake()
    args = make_args(immiscible_k=8, noise_selection="knn", knn_noise_k=8)
    with pytest.raises(ValueError, match="--noise_selection knn"):
        ADAPTER.start_up(args)
    ADAPTER.start_up(make_args(immiscible_k=8, noise_selection="gaussian", knn_noise_k=8))


# --------------------------------------------------------------------------- install.py --check per trainer


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


def test_without_the_guard_selection_is_refused(fake, monkeypatch):
    """accelerate's Accelerator.backward gone (or renamed): nothing could stop an unselected run."""
    tu, accelerate = fake()
    monkeypatch.setitem(RUNTIME.points, ADAPTER.guard.name, __import__("immiscible_host.points").points.broken(
        "accelerate.Accelerator.backward not found"))
    with pytest.raises(ValueError, match="first-step guard accelerate.Accelerator.backward is unavailable"):
        ADAPTER.start_up(make_args(immiscible_k=8))
    ADAPTER.start_up(make_args())  # off: fine
