"""immiscible_host: options, start-up, run-time selection with fallback, seeds and telemetry."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import immiscible
from immiscible_host import options, preflight, ranks, telemetry
from immiscible_host.points import SD_NOISE, PatchPoint, broken, ok
from immiscible_host.runtime import Runtime
from helpers import fake_adapter

LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def ns(**kw):
    return argparse.Namespace(**{**options.DEFAULTS, **kw})


# --------------------------------------------------------------------------- options


def test_options_follow_the_core_vocabulary():
    p = argparse.ArgumentParser()
    options.add_immiscible_arguments(p, k_help="K")
    options.add_immiscible_arguments(p, k_help="K")  # idempotent
    choices = {a.dest: a.choices for a in p._actions}
    assert choices["immiscible_mode"] == immiscible.MODES and choices["immiscible_metric"] == immiscible.METRICS
    assert choices["immiscible_backend"] == immiscible.BACKENDS
    q = argparse.ArgumentParser()
    options.add_immiscible_arguments(q, k_help="K", validation=False)
    assert not any("--immiscible_validation" in a.option_strings for a in q._actions)
    assert options.settings_from_args(q.parse_args(["--immiscible_k", "4"])) == options.Settings(k=4)


@pytest.mark.parametrize("key,value,needle", [
    ("immiscible_k", immiscible.K_MAX + 1, f"[{immiscible.K_MIN}, {immiscible.K_MAX}] (1 = off)"),
    ("immiscible_k", "8", "got '8' (str)"),
    ("immiscible_mode", "hungarian", "immiscible_mode must be one of"),
    ("immiscible_backend", None, "immiscible_backend must be one of"),
    ("immiscible_validation", 1, "immiscible_validation must be true or false"),
    ("immiscible_coarse", -1, f"immiscible_coarse must be in [0, {immiscible.COARSE_MAX}] (0 = off"),
    ("immiscible_coarse", "8", "immiscible_coarse must be an integer"),
])
def test_settings_errors_name_the_key_and_range(key, value, needle):
    with pytest.raises((TypeError, ValueError)) as info:
        options.settings_from_args(ns(**{key: value}))
    assert needle in str(info.value)


def test_metadata_only_when_enabled():
    s = options.Settings(k=64, metric="cosine")
    assert s.metadata() == {"ss_immiscible_k": "64", "ss_immiscible_mode": "knn", "ss_immiscible_metric": "cosine",
                            "ss_immiscible_coarse": "0", "ss_immiscible_validation": "False",
                            "ss_immiscible_scope": "rank"}
    assert options.Settings(k=4, coarse=8).metadata()["ss_immiscible_coarse"] == "8"
    base = {"a": "1"}
    assert options.with_metadata(base, s) == {**base, **s.metadata()} and base == {"a": "1"}
    assert options.with_metadata(base, s, no_metadata=True) is base
    assert options.with_metadata(base, options.Settings()) is base and options.with_metadata(base, None) is base


# --------------------------------------------------------------------------- runtime


def test_select_uses_torch_seed_stream_and_records(monkeypatch, tmp_path):
    rt = Runtime(dump_env="HOST_TEST_DUMP")
    assert rt.select(LATENTS, "p") is None  # not configured: stock
    rt.configure(options.Settings(k=8))
    monkeypatch.setenv("HOST_TEST_DUMP", str(tmp_path))
    torch.manual_seed(3)
    got = rt.select(LATENTS, "p")
    torch.manual_seed(3)
    assert torch.equal(got, immiscible.select_noise(LATENTS, 8))
    row = json.loads((tmp_path / "rank0.jsonl").read_text())
    assert row["point"] == "p" and row["k"] == 8 and row["world_size"] == 1 and row["seed"] == row["drawn_seed"]
    assert rt.calls == 1 and 0 < rt.window.for_log() < 1 and rt.stock_batches == 0


def test_coarse_selects_in_pooled_space_and_a_too_small_latent_falls_back(monkeypatch, tmp_path, caplog):
    rt = Runtime(dump_env="HOST_TEST_DUMP")
    rt.configure(options.Settings(k=8, coarse=2))
    monkeypatch.setenv("HOST_TEST_DUMP", str(tmp_path))
    torch.manual_seed(5)
    got = rt.select(LATENTS, "p")
    torch.manual_seed(5)
    assert torch.equal(got, immiscible.select_noise(LATENTS, 8, coarse=2))
    row = json.loads((tmp_path / "rank0.jsonl").read_text())
    assert row["coarse"] == 2 and 0 < row["coarse_reduction"] < 1
    rt.configure(options.Settings(k=8, coarse=LATENTS.shape[-1] + 1))  # a bucket smaller than N x N
    with caplog.at_level("WARNING"):
        assert rt.select(LATENTS, "p") is None
    assert rt.stock_batches == 1 and "immiscible_coarse must be in [0, " in caplog.text


def test_failures_fall_back_warn_once_and_are_counted(caplog):
    rt = Runtime()
    rt.configure(options.Settings(k=256, mode="assign"))
    huge = torch.zeros(1024, 1)  # 1024^2 * 256 > 2**27 cost entries: refused
    bad = LATENTS.clone()
    bad[0, 0, 0, 0] = float("nan")
    with caplog.at_level("WARNING"):
        for x in (bad, bad, huge):
            assert rt.select(x, "p") is None
    assert rt.stock_batches == 3 and sum(rt.stock_reasons.values()) == 3
    assert sum("selection failed" in r.message for r in caplog.records) == 1  # both are ValueErrors


def test_validation_frames_keep_stock_noise():
    rt = Runtime(validation_arg="is_train")
    rt.configure(options.Settings(k=4))

    def trainer_step(is_train):
        return rt.select(LATENTS, "p")

    assert trainer_step(is_train=False) is None and trainer_step(is_train=True) is not None
    rt.configure(options.Settings(k=4, validation=True))
    assert trainer_step(is_train=False) is not None
    assert Runtime().in_validation() is False


def test_lazy_settings_never_kill_a_run(caplog):
    rt = Runtime()
    with caplog.at_level("WARNING"):
        assert not rt.active(ns(immiscible_k="64"))
    assert rt.settings == options.Settings() and "using stock noise" in caplog.text
    rt.reset()
    assert rt.active(ns(immiscible_k=4)) and rt.settings.k == 4


def test_ranks_get_different_seeds(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    seeds = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        torch.manual_seed(0)
        seeds.append(ranks.draw_rank_seed())
    assert seeds[0].drawn == seeds[1].drawn and seeds[0].seed != seeds[1].seed
    assert seeds[1].seed == immiscible.derive_seed(seeds[1].drawn, 1) and seeds[1].world_size == 2


# --------------------------------------------------------------------------- telemetry


def test_reduction_window_and_trackers():
    window = telemetry.ReductionWindow()
    logged = []

    class Tracker:
        def log(self, values, step=None):
            logged.append(values)

    tracker = Tracker()
    telemetry.wrap_tracker(tracker, window)
    telemetry.wrap_tracker(tracker, window)  # idempotent
    tracker.log({"loss/current": 1.0})
    window.add(0.5, 2)
    window.add(0.1, 2)
    tracker.log({"loss/current": 1.0}, step=1)
    tracker.log({"loss": 2.0}, step=1)  # a second tracker call for the same step: same value
    tracker.log({"lr": 1e-4})
    window.add(0.4, 1)
    tracker.log({"loss/current": 1.0})
    assert "immiscible/reduction" not in logged[0] and "immiscible/reduction" not in logged[3]
    assert logged[1]["immiscible/reduction"] == pytest.approx(0.15) == logged[2]["immiscible/reduction"]
    assert logged[4]["immiscible/reduction"] == pytest.approx(0.4)


def test_init_trackers_wraps_only_when_enabled():
    rt = Runtime()

    class Acc:
        def __init__(self):
            self.trackers = []

        def init_trackers(self, name):
            self.trackers = [type("T", (), {"log": lambda self, v, step=None: None})()]

    init = telemetry.wrap_init_trackers(Acc.init_trackers, rt)
    acc = Acc()
    init(acc, "x")
    assert not hasattr(acc.trackers[0].log, "__immiscible_patched__")
    rt.configure(options.Settings(k=2))
    init(acc, "x")
    assert acc.trackers[0].log.__immiscible_patched__


# --------------------------------------------------------------------------- start-up

POINT = PatchPoint("host.noise", "pkg.util", "make_noise", SD_NOISE, scripts=("train.py",))


def test_start_up_checks_the_needed_point(caplog):
    adapter = fake_adapter([POINT], script="train.py")
    rt = adapter.runtime
    with pytest.raises(ValueError, match="host.noise needed by train.py is unavailable: its module was not imported"):
        adapter.start_up(ns(immiscible_k=4))
    with caplog.at_level("WARNING"):
        assert adapter.start_up(ns()) == options.Settings()
    assert "immiscible is off, carrying on" in caplog.text
    rt.points[POINT.name] = broken("gone")
    with pytest.raises(ValueError, match=r"unavailable: broken \(gone\).*fakehost version: unknown"):
        adapter.start_up(ns(immiscible_k=4))
    rt.points[POINT.name] = ok()
    s = adapter.start_up(ns(immiscible_k=4, no_metadata=True))
    assert s.k == 4 and rt.backend == "torch" and rt.enabled and rt.no_metadata
    adapter.script = "other.py"
    assert adapter.start_up(ns(immiscible_k=4)).k == 4  # unknown script: no check


def test_start_up_errors_name_the_config_file_and_use_the_parser():
    adapter = fake_adapter()
    with pytest.raises(ValueError, match=r"got '64' \(str\) \(set in --config_file c.toml or on the command line\)"):
        adapter.start_up(ns(immiscible_k="64", config_file="c.toml"))
    parser = argparse.ArgumentParser(prog="train")
    with pytest.raises(SystemExit) as info:
        adapter.start_up(ns(immiscible_k=0), parser)
    assert info.value.code == 2

    def no_two(args, settings):
        raise ValueError("conflict")

    with pytest.raises(ValueError, match="conflict"):
        fake_adapter(checks=(no_two,)).start_up(ns(immiscible_k=2))


def test_start_up_refuses_selection_when_the_guard_point_is_broken():
    adapter = fake_adapter()
    adapter.runtime.points[adapter.guard.name] = broken("accelerate changed")
    assert adapter.start_up(ns(immiscible_k=1)).k == 1     # off: nothing to guard
    with pytest.raises(ValueError, match="first-step guard fake.Step.backward is unavailable .*accelerate changed"):
        adapter.start_up(ns(immiscible_k=4))


@pytest.mark.parametrize("settings", [options.Settings(k=8), options.Settings(k=64, mode="assign", metric="cosine",
                                                                              coarse=4, validation=True)])
def test_the_summary_line_says_every_setting_and_the_active_points(settings):
    line = preflight.summary(settings, "torch", ["a", "b"])
    fields = dict(word.split("=", 1) for word in line.split(";")[0].split() if "=" in word)
    assert (int(fields["k"]), fields["mode"], fields["metric"], fields["backend"]) == (settings.k, settings.mode,
                                                                                      settings.metric, "torch")
    assert fields["coarse"] == (f"{settings.coarse}x{settings.coarse}" if settings.coarse else "off")
    assert fields["noise"] == ("selected" if settings.validation else "stock")
    assert line.endswith("patch points active: a, b") and preflight.summary(settings, "torch", []).endswith("none")


@pytest.mark.parametrize("key", ["immiscible_K", "immisible_k", "immiscible-k", "Immiscible_Mode", "immiscibel_coarse"])
def test_a_mistyped_option_key_stops_the_start_up(key):
    """sd-scripts keeps unknown --config_file keys silently: a near miss of ours must not train on stock noise."""
    args = ns(**{key: 8}, config_file="my.toml")
    with pytest.raises(ValueError, match=rf"unknown option '{key}' \(did you mean immiscible_[a-z]+\?\).*my.toml"):
        fake_adapter().start_up(args)


def test_unrelated_keys_are_not_near_misses():
    args = ns(network_dim=4, image_k=3, noise_offset=0.1, mixed_precision="no", min_snr_gamma=5, immiscible_k=4)
    assert options.near_misses(args) == []
    assert fake_adapter().start_up(args).k == 4


def test_assign_without_scipy_stops_at_start_up(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(ValueError, match="--immiscible_mode assign needs scipy.*pip install scipy"):
        fake_adapter().start_up(ns(immiscible_k=4, immiscible_mode="assign"))
    assert fake_adapter().start_up(ns(immiscible_k=4, immiscible_mode="knn")).mode == "knn"


def test_validation_selection_is_refused_where_the_host_has_no_validation():
    """musubi-tuner has no --immiscible_validation; a config file could still set the key."""
    with pytest.raises(ValueError, match="immiscible_validation: fakehost has no validation passes"):
        fake_adapter(validation_arg=None).start_up(ns(immiscible_k=4, immiscible_validation=True))
    assert fake_adapter(validation_arg="is_train").start_up(ns(immiscible_k=4, immiscible_validation=True)).validation
