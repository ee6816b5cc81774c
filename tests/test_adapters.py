"""What both training-program adapters do, run once per host on its fake (tests/helpers.py).

Every case runs for sd-scripts (``kohya_patch``) and for musubi-tuner (``musubi_patch``), each
driven like its trainers drive it (:class:`helpers.FakeHost`): the ``--immiscible_*`` options and
their checks (command line, config file, a mistyped key), k = 1 / absent bit-identical to stock,
k > 1 selecting, the fallback and its counts, the first-step guard, metadata and trackers.
What only one host has is in tests/test_kohya_patch.py and tests/test_musubi_patch.py.
"""
from __future__ import annotations

import random
import sys

import pytest
import torch

import immiscible
from helpers import FAKE_HOSTS, fake_host, nan_latents, selected_noise
from immiscible_host.hook import MARK
from immiscible_host.options import Settings
from immiscible_host.points import CONFIG, GUARD, INLINE, METADATA, OPTIONS, START_UP, TRACKERS
from immiscible_host.ranks import seed_from_draw
from immiscible_host.runtime import SelectionNotApplied
from immiscible_host.telemetry import REDUCTION_KEY, STOCK_KEY

#: What a bad ``immiscible_k`` is told: the key and its range.
K_RANGE = ("immiscible_k must be", f"[{immiscible.K_MIN}, {immiscible.K_MAX}] (1 = off), got ")


def _names(err, needle):
    return all(n in err for n in ((needle,) if isinstance(needle, str) else needle))


@pytest.fixture(params=list(FAKE_HOSTS))
def host(request, tmp_path, monkeypatch):
    """Each host's fake, imported through that adapter's hook (its ``ADAPTER.hook``)."""
    with fake_host(request.param, tmp_path, monkeypatch) as h:
        yield h


def _resolve(module, attribute):
    for part in attribute.split("."):
        module = getattr(module, part)
    return module


# --------------------------------------------------------------------------- the hook


def test_the_hook_patches_every_point_its_imports_trigger(host):
    checked = set()
    for point in host.host.points:
        if point.kind == INLINE or point.module not in sys.modules:
            continue
        fn = _resolve(sys.modules[point.module], point.attribute)
        assert getattr(fn, MARK, False), point.name
        assert host.runtime.points[point.name].ok, point.name
        checked.add(point.kind)
    assert {OPTIONS, CONFIG, START_UP, METADATA, TRACKERS, GUARD} <= checked
    host.adapter.hook.install()  # again: idempotent, nothing wrapped twice
    for point in host.host.points:
        if point.kind != INLINE and point.module in sys.modules:
            assert not getattr(_resolve(sys.modules[point.module], point.attribute).__wrapped__, MARK, False)


def test_the_advice_names_the_check_command(host):
    advice = host.adapter.advice()
    assert f"install.py --check {host.host.install_flag}" in advice and sys.executable in advice


# --------------------------------------------------------------------------- options and the config file


def test_options_are_registered_and_start_up_logs_one_summary(host, caplog):
    with caplog.at_level("INFO"):
        args = host.parse("--immiscible_k", "8", "--immiscible_mode", "assign", "--immiscible_metric", "cosine",
                          "--immiscible_coarse", "2")
        host.start_up_point(args)  # the second start-up of the same run: no second summary
    assert (args.immiscible_k, args.immiscible_mode, args.immiscible_metric, args.immiscible_coarse) == (
        8, "assign", "cosine", 2)
    assert host.runtime.settings == Settings(k=8, mode="assign", metric="cosine", coarse=2)
    # --immiscible_validation only where the host has validation passes
    assert hasattr(args, "immiscible_validation") == (host.host.validation_arg is not None)
    summaries = [r.message for r in caplog.records if r.message.startswith("immiscible: k=")]
    assert len(summaries) == 1
    assert summaries[0].startswith("immiscible: k=8 mode=assign metric=cosine coarse=2x2 backend=torch")
    assert summaries[0].endswith(host.noise_point) or f"{host.noise_point}," in summaries[0]


def test_off_by_default(host):
    args = host.parse()
    assert args.immiscible_k == 1 and host.runtime.settings == Settings() and not host.runtime.enabled


@pytest.mark.parametrize("argv,needle", [
    (("--immiscible_k", "0"), K_RANGE),
    (("--immiscible_k", str(immiscible.K_MAX + 1)), K_RANGE),
    (("--immiscible_k", "x"), "--immiscible_k: invalid int value"),
    (("--immiscible_coarse", "-1"), f"immiscible_coarse must be in [0, {immiscible.COARSE_MAX}]"),
    (("--immiscible_mode", "hungarian"), "--immiscible_mode: invalid choice"),
    (("--immiscible_metric", "l1"), "--immiscible_metric: invalid choice"),
    (("--immiscible_backend", "cuda"), "--immiscible_backend: invalid choice"),
], ids=["k=0", "k>max", "k=x", "coarse=-1", "mode", "metric", "backend"])
def test_bad_command_line_values_exit_2_naming_the_key_and_range(host, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        host.parse(*argv)
    assert exc.value.code == 2 and _names(capsys.readouterr().err, needle)
    assert host.runtime.settings is None  # nothing configured: the run stops before any model loads


def test_config_file_values_are_read_under_the_command_line(host, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[immiscible]\nimmiscible_k = 6\nimmiscible_mode = "assign"\nimmiscible_metric = "l2"\n')
    args = host.parse("--config_file", str(cfg), "--immiscible_metric", "cosine")
    assert args.immiscible_k == 6
    assert host.runtime.settings == Settings(k=6, mode="assign", metric="cosine")


@pytest.mark.parametrize("line,needle", [
    ('immiscible_k = "64"', (*K_RANGE, "'64' (str)")),
    ("immiscible_k = 64.5", K_RANGE),
    ("immiscible_k = 0", K_RANGE),
    ("immiscible_k = -3", K_RANGE),
    ('immiscible_mode = "hungarian"', "immiscible_mode must be one of"),
    ("immiscible_coarse = 1.5", "immiscible_coarse must be an integer"),
    ("immiscible_validation = 1", "immiscible_validation must be true or false"),
    ("immiscible_K = 8", "unknown option 'immiscible_K' (did you mean immiscible_k?)"),
    ("immisible_k = 8", "unknown option 'immisible_k' (did you mean immiscible_k?)"),
], ids=["k-string", "k-float", "k=0", "k<0", "mode", "coarse-float", "validation-int", "key-case", "key-typo"])
def test_bad_config_file_values_exit_2_naming_the_key_and_the_file(host, tmp_path, capsys, line, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[immiscible]\n{line}\n")
    with pytest.raises(SystemExit) as exc:
        host.parse("--config_file", str(cfg))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and _names(err, needle) and f"(set in --config_file {cfg}" in err


def test_the_start_up_point_checks_the_namespace(host):
    """A value or key that reached the namespace some other way stops the start-up point too."""
    args = host.parse("--immiscible_k", "8")
    args.immiscible_k = "64"  # a TOML string
    with pytest.raises(ValueError, match="immiscible_k must be an integer"):
        host.start_up_point(args)
    args.immiscible_k = 8
    args.immiscible_Mode = "assign"
    with pytest.raises(ValueError, match=r"unknown option 'immiscible_Mode' \(did you mean immiscible_mode\?\)"):
        host.start_up_point(args)
    del args.immiscible_Mode
    host.start_up_point(args)
    assert host.runtime.settings.k == 8


# --------------------------------------------------------------------------- off and on


@pytest.mark.parametrize("argv", [(), ("--immiscible_k", "1")], ids=["absent", "k=1"])
def test_off_is_bit_identical_to_stock_and_consumes_no_random_numbers(host, argv):
    original = torch.randn_like
    args = host.parse(*argv)
    _, noise = host.step(args, seed=3)
    after = torch.get_rng_state(), random.getstate()
    want, want_state, want_random = host.stock(args, seed=3)
    assert torch.equal(noise, want)
    assert torch.equal(after[0], want_state) and after[1] == want_random
    assert torch.randn_like is original  # nothing intercepted
    assert host.runtime.calls == 0 and host.runtime.stock_batches == 0


@pytest.mark.parametrize("argv,kw", [
    (("--immiscible_k", "8"), {}),
    (("--immiscible_k", "4", "--immiscible_mode", "assign", "--immiscible_metric", "cosine"),
     {"mode": "assign", "metric": "cosine"}),
    (("--immiscible_k", "4", "--immiscible_coarse", "2"), {"coarse": 2}),
], ids=["knn", "assign-cosine", "coarse"])
def test_selection_is_select_noise_seeded_from_the_hosts_own_draw(host, argv, kw):
    args = host.parse(*argv)
    k = args.immiscible_k
    seen, noise = host.step(args, seed=0)
    after = torch.get_rng_state(), random.getstate()
    assert torch.equal(noise, selected_noise(seen, k, seed=0, **kw))
    stock, stock_state, stock_random = host.stock(args, seed=0)
    # the host's random streams are stock's: selecting consumed none of its random numbers
    assert torch.equal(after[0], stock_state) and after[1] == stock_random
    assert not torch.equal(noise, stock)
    assert host.runtime.calls == 1 and host.runtime.stock_batches == 0
    reduction = host.runtime.window.for_log()  # at full resolution; coarse selection ranks pooled latents
    assert reduction is not None and (0 < reduction < 1 or "coarse" in kw)


def test_selection_is_reproducible_and_nearer_than_stock(host):
    args = host.parse("--immiscible_k", "8")
    seen, a = host.step(args, seed=0)
    _, b = host.step(args, seed=0)
    _, other = host.step(args, seed=1)
    stock = host.stock(args, seed=0)[0]
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert ((a - seen) ** 2).sum() < ((stock - seen) ** 2).sum()


def test_ranks_draw_from_different_pools(host, monkeypatch, tmp_path):
    args = host.parse("--immiscible_k", "8")
    monkeypatch.setenv(host.host.dump_env, str(tmp_path / "dump"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        seen, out[rank] = host.step(args, seed=0)
        assert torch.equal(out[rank], selected_noise(seen, 8, seed=0, rank=rank))
    assert not torch.equal(out[0], out[1])
    torch.manual_seed(0)
    drawn = seed_from_draw(torch.randn_like(seen))
    rows = [(tmp_path / "dump" / f"rank{r}.jsonl").read_text() for r in (0, 1)]
    assert all('"drawn_seed": %d' % drawn in row and '"world_size": 2' in row for row in rows)
    assert f'"seed": {immiscible.derive_seed(drawn, 1)}' in rows[1]


# --------------------------------------------------------------------------- fallback


def test_later_failures_fall_back_to_the_stock_draw_warn_once_and_are_counted(host, monkeypatch, caplog):
    args = host.parse("--immiscible_k", "8")
    acc = host.accelerator()
    host.step(args, acc=acc)  # a selected first step: the guard lets the run go on
    bad = nan_latents(host.latents)
    real = immiscible.select_noise
    failing = []

    def flaky(*a, **kw):
        if failing:
            raise RuntimeError("kernel exploded")
        return real(*a, **kw)

    monkeypatch.setattr(immiscible, "select_noise", flaky)
    with caplog.at_level("WARNING"):
        for seed in (1, 2):
            _, noise = host.step(args, bad, seed=seed, acc=acc)
            assert torch.isfinite(noise).all() and torch.equal(noise, host.stock(args, bad, seed=seed)[0])
        failing.append(True)
        for seed in (3, 4):
            _, noise = host.step(args, seed=seed, acc=acc)
            assert torch.equal(noise, host.stock(args, seed=seed)[0])
        failing.clear()
        host.step(args, seed=5, acc=acc)  # a good batch: not counted
    messages = [r.message for r in caplog.records]
    assert sum("NaN or infinite values" in m and "data or VAE problem" in m for m in messages) == 1
    assert sum("selection failed at" in m and "kernel exploded" in m for m in messages) == 1
    assert acc.steps == 6 and host.runtime.calls == 2
    assert host.runtime.stock_batches == 4
    assert host.runtime.stock_reasons == {"select:non-finite-latents": 2, "select:RuntimeError": 2}


def test_later_fallbacks_are_counted_in_metadata_and_trackers(host):
    args = host.parse("--immiscible_k", "8")
    acc = host.accelerator()
    acc.init_trackers("run")
    host.step(args, acc=acc)
    bad = nan_latents(host.latents)
    for step in range(3):  # e.g. a bad batch at step 5000: warn once, stock noise, counted
        host.step(args, bad, seed=step, acc=acc)
        acc.log({"loss/current": 1.0}, step=step + 1)
    assert acc.steps == 4 and host.runtime.stock_batches == 3
    assert [v[STOCK_KEY] for v in acc.trackers[0].logged] == [1, 2, 3]
    md = host.metadata(args)
    assert md["ss_immiscible_stock_batches"] == "3" and md["ss_immiscible_k"] == "8"


# --------------------------------------------------------------------------- the first-step guard


def test_a_selected_run_trains_on(host):
    assert host.runtime.points[host.adapter.guard.name].ok and host.adapter.guard.kind == GUARD
    args = host.parse("--immiscible_k", "8")
    acc = host.accelerator()
    host.step(args, acc=acc)
    host.step(args, seed=1, acc=acc)
    acc.backward(torch.zeros(()))
    assert acc.steps == 3 and host.runtime.calls == 2 and host.runtime.stock_batches == 0


@pytest.mark.parametrize("argv", [(), ("--immiscible_k", "1")], ids=["absent", "k=1"])
def test_off_never_stops(host, argv):
    host.parse(*argv)
    acc = host.accelerator()
    torch.randn_like(host.latents)  # noise drawn outside every patch point: fine when off
    acc.backward(torch.zeros(()))
    assert acc.steps == 1 and host.runtime.calls == 0


def test_a_trainer_whose_noise_bypasses_every_point_stops_before_its_first_step(host):
    """An unknown trainer (or a known one drawing its noise some new way): no draw was selected."""
    host.adapter.script = "my_new_train.py"
    args = host.parse("--immiscible_k", "8")
    acc = host.accelerator()
    torch.randn_like(host.latents)  # drawn inline, not through any patch point
    with pytest.raises(SelectionNotApplied) as info:
        acc.backward(torch.zeros(()))
    msg = str(info.value)
    assert acc.steps == 0 and args.immiscible_k == 8
    assert "--immiscible_k 8" in msg and "my_new_train.py (version " in msg and "does not intercept" in msg
    assert f"install.py --check {host.host.install_flag}" in msg and "open an issue" in msg
    acc.backward(torch.zeros(()))  # only the first step is checked
    assert acc.steps == 1


def test_a_first_draw_that_fell_back_stops_the_run(host):
    args = host.parse("--immiscible_k", "8")
    acc = host.accelerator()
    with pytest.raises(SelectionNotApplied, match="NaN or infinite values.*data or VAE problem") as info:
        host.step(args, nan_latents(host.latents), acc=acc)
    assert acc.steps == 0 and "install.py --check" not in str(info.value)  # a data problem: no install advice


def test_a_coarse_size_the_latents_cannot_take_stops_the_first_step(host):
    """--immiscible_coarse is checked against the latents' shape at the first draw (not known at start-up)."""
    args = host.parse("--immiscible_k", "8", "--immiscible_coarse", "64")
    acc = host.accelerator()
    with pytest.raises(SelectionNotApplied, match=r"immiscible_coarse must be in \[0, 8\] for latents of shape"):
        host.step(args, acc=acc)
    assert acc.steps == 0 and host.runtime.stock_reasons == {"select:coarse": 1}


def test_without_the_guard_selection_is_refused_at_start_up(host, capsys):
    """accelerate's Accelerator.backward gone (or renamed): nothing could stop an unselected run."""
    acc = host.files["accelerate/__init__.py"].replace("def backward(", "def backward_renamed(")
    host.build(files={"accelerate/__init__.py": acc})
    guard = host.adapter.guard.name
    assert host.runtime.points[guard].state == "broken"
    with pytest.raises(SystemExit) as exc:
        host.parse("--immiscible_k", "8")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"first-step guard {guard} is unavailable" in err and "--immiscible_k 8" in err
    assert host.parse().immiscible_k == 1  # off: fine


# --------------------------------------------------------------------------- patch points


def test_a_needed_point_missing_is_an_error_when_on_and_a_warning_when_off(host, capsys, caplog):
    script, point = host.unimported_script
    host.adapter.script = script
    with pytest.raises(SystemExit) as exc:
        host.parse("--immiscible_k", "8")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"patch point {point} needed by {script} is unavailable" in err
    assert f"({host.host.name} version: " in err and f"install.py --check {host.host.install_flag}" in err
    with caplog.at_level("WARNING"):
        host.parse()
    assert sum(point in r.message and "immiscible is off, carrying on" in r.message for r in caplog.records) == 1


def test_a_point_whose_signature_changed_is_left_unwrapped_and_the_host_works(host):
    path, drifted = host.metadata_drift
    host.build(files={path: drifted})
    point = next(p for p in host.host.points if p.kind == METADATA)
    fn = _resolve(sys.modules[point.module], point.attribute)
    status = host.runtime.points[point.name]
    assert not getattr(fn, MARK, False)
    assert status.state == "broken" and f"parameters ['{point.params[0]}'] missing" in status.detail
    args = host.parse("--immiscible_k", "8")  # not a needed point: selection still runs
    assert host.metadata(args) == host.base_metadata
    host.step(args)
    assert host.runtime.calls == 1


# --------------------------------------------------------------------------- metadata and trackers


def test_metadata_only_when_selecting_and_not_with_no_metadata(host):
    args = host.parse()
    assert host.metadata(args) == host.base_metadata
    args = host.parse("--immiscible_k", "64", "--immiscible_mode", "assign", "--immiscible_metric", "cosine")
    assert host.metadata(args) == {**host.base_metadata, "ss_immiscible_k": "64", "ss_immiscible_mode": "assign",
                                   "ss_immiscible_metric": "cosine", "ss_immiscible_coarse": "0",
                                   "ss_immiscible_validation": "False", "ss_immiscible_stock_batches": "0",
                                   "ss_immiscible_scope": "rank"}
    args = host.parse("--immiscible_k", "8", "--no_metadata")
    assert host.metadata(args) == host.base_metadata


@pytest.mark.parametrize("k", [1, 8])
def test_trackers_log_the_reduction_only_with_selection(host, k):
    args = host.parse("--immiscible_k", str(k))
    acc = host.accelerator()
    acc.init_trackers("run")
    host.step(args, acc=acc)
    acc.log({"loss/current": 1.0}, step=1)
    acc.log({"loss/epoch_average": 1.0}, step=1)  # not a per-step loss log
    current, epoch = acc.trackers[0].logged
    assert REDUCTION_KEY not in epoch and STOCK_KEY not in epoch
    if k == 1:
        assert current == {"loss/current": 1.0}
    else:
        assert 0 < current[REDUCTION_KEY] < 1 and current[STOCK_KEY] == 0
