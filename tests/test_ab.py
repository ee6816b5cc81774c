"""The A/B command (kohya_patch/ab) on a fake trainer script, and the recorder on the fake ``library``.

The fake trainer has sd-scripts' shape where the A/B touches it: a ``setup_parser()``, a
``train_util.read_config_from_file`` that flattens a TOML, and a run that appends the recorder's
rows (a training row per step, a validation pass every ``validate_every_n_steps``) whose validation
loss is ``base(seed, item, timestep) * (1 + EFFECT * log k)``: the A/B must find that effect. It
imports no torch, so each run costs a Python start. tests/integration/test_sd_scripts_ab.py runs the
real sd-scripts.
"""
from __future__ import annotations

import json
import math
import sys
import textwrap
import types

import pytest

from helpers import fake_host
from immiscible_host import record
from kohya_patch.ab import cli, plan, report

FAKE_TRAINER = textwrap.dedent('''
    import argparse, json, math, os, random, sys, types
    import tomllib

    EFFECT = -0.02

    def setup_parser():
        p = argparse.ArgumentParser()
        for name, typ, default in (("config_file", str, None), ("seed", int, None), ("output_dir", str, None),
                                   ("logging_dir", str, None), ("output_name", str, None),
                                   ("max_train_steps", int, 1600), ("max_train_epochs", int, None),
                                   ("validation_seed", int, None), ("validation_split", float, 0.0),
                                   ("validate_every_n_steps", int, None), ("validate_every_n_epochs", int, None),
                                   ("sample_prompts", str, None), ("dataset_config", str, None), ("in_json", str, None),
                                   ("gradient_accumulation_steps", int, 1), ("huggingface_repo_id", str, None),
                                   ("learning_rate", float, 1e-4), ("network_args", str, None)):
            p.add_argument("--" + name, type=typ, default=default, nargs="*" if name == "network_args" else None)
        p.add_argument("--async_upload", action="store_true")
        p.add_argument("--cache_latents_to_disk", action="store_true")
        p.add_argument("--immiscible_validation", action="store_true")   # the pack's options, as its hook adds them
        for name, typ, default in (("k", int, 1), ("mode", str, "knn"), ("metric", str, "l2"),
                                   ("backend", str, "auto"), ("coarse", int, 0)):
            p.add_argument("--immiscible_" + name, type=typ, default=default)
        return p

    def read_config_from_file(args, parser):
        if not args.config_file:
            return args
        with open(args.config_file, "rb") as f:
            flat = {}
            for key, value in tomllib.load(f).items():
                flat.update(value if isinstance(value, dict) else {key: value})
        return parser.parse_args(namespace=argparse.Namespace(**flat))

    train_util = types.SimpleNamespace(read_config_from_file=read_config_from_file)

    def main():
        parser = setup_parser()
        args = read_config_from_file(parser.parse_args(), parser)
        if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in args.output_dir:
            print("RuntimeError: the fake trainer failed on purpose", file=sys.stderr)
            sys.exit(3)
        rec = os.path.join(os.environ["IMMISCIBLE_RECORD"], "record.rank0.jsonl")
        os.makedirs(os.path.dirname(rec), exist_ok=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f)
        rng = random.Random(args.seed)                     # the trainer's own stream: the same at any k
        luck = random.Random(args.seed * 1000 + args.immiscible_k).gauss(0, 0.003)
        factor = 1 + EFFECT * math.log(args.immiscible_k) + luck
        with open(rec, "a") as f:
            for step in range(1, args.max_train_steps + 1):
                f.write(json.dumps({"pass": "train", "train_calls": step - 1, "loss": [0.1],
                                    "timesteps": [rng.randrange(1000)], "items": [str(rng.randrange(8))],
                                    "t": step * (0.1 + 0.01 * (args.immiscible_k > 1))}) + "\\n")
                if args.validate_every_n_steps and step % args.validate_every_n_steps == 0:
                    for t in (200, 400, 600, 800):
                        for item in ("a", "b"):
                            base = (1 + t / 1000) * (1 + 0.5 / step) * (1 + 0.1 * (item == "a"))
                            f.write(json.dumps({"pass": "val", "train_calls": step, "loss": [base * factor],
                                                "timesteps": [t], "items": [item],
                                                "t": step * (0.1 + 0.01 * (args.immiscible_k > 1))}) + "\\n")

    if __name__ == "__main__":
        main()
''')


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    script = tmp_path / "train_network.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(cli, "ADAPTER", types.SimpleNamespace(hook=types.SimpleNamespace(install=lambda: None)))
    monkeypatch.setattr(cli, "report", _NoFigures)
    monkeypatch.setattr(cli, "POLL_S", 0.02)   # figures are drawn in test_report_writes_figures
    return script


class _NoFigures:
    @staticmethod
    def write_report(res, meta, out, arm_dirs):
        text = report.markdown(res, dict(meta, figures=[]))
        (out / "report.md").write_text(text)
        return out / "report.md"


def ab(script, *own, train=("--seed", "5", "--max_train_steps", "4", "--validate_every_n_steps", "2",
                            "--validation_split", "0.25")):
    return cli.main([*own, "--", sys.executable, str(script), *train])


def test_a_two_arm_ab_finds_the_known_effect_and_keeps_the_host_streams(trainer, tmp_path):
    assert ab(trainer, "--k", "8", "--seeds", "3", "--out", "r") == 0
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["seeds"] == [5, 6, 7]
    assert res["interval"]["n"] == 3
    true_effect = math.log1p(-0.02 * math.log(8))
    assert res["interval"]["low"] < true_effect < res["interval"]["high"] < 0
    for r in res["per_seed"].values():
        assert r["crn"] == {"steps": [4, 4], "same_timesteps": True, "same_images": True}
        assert r["final_step"] == [4, 4] and r["same_validation_items"]
        assert [s for s, _ in r["curve"]["control"]] == [2, 4]
    assert res["overhead"][0] == pytest.approx(0.01)
    text = (tmp_path / "r" / "report.md").read_text()
    assert "lowers the validation loss" in text and "stock noise" in text and "Per timestep" in text
    # every arm ran the same command but --seed and --immiscible_*; validation fixed; outputs under --out
    runs = {p.parent.parent.name: json.loads(p.read_text()) for p in (tmp_path / "r" / "runs").glob("*/model/args.json")}
    c, t = runs["seed5-control"], runs["seed5-treatment"]
    assert c["immiscible_k"] == 1 and t["immiscible_k"] == 8 and not t["immiscible_validation"]
    assert {k for k in c if c[k] != t[k]} == {"immiscible_k", "output_dir", "logging_dir", "config_file"}
    assert c["validation_seed"] == runs["seed7-treatment"]["validation_seed"] == plan.DEFAULT_VALIDATION_SEED
    assert runs["seed6-control"]["seed"] == 6 and c["output_dir"].startswith(str(tmp_path / "r"))


def test_self_test_is_exactly_zero_and_two_seeds_give_no_interval(trainer, tmp_path):
    assert ab(trainer, "--self_test", "--seeds", "2", "--out", "aa") == 0
    res = json.loads((tmp_path / "aa" / "results.json").read_text())
    assert res["effects"] == [0.0, 0.0] and res["interval"] is None
    assert all(r["exactly_equal"] for r in res["per_seed"].values())
    assert "exactly 0" in res["verdict"]


def test_a_failed_arm_stops_with_the_trainers_error_and_a_rerun_resumes_there(trainer, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setenv("FAKE_FAIL", "seed6-control")
    assert ab(trainer, "--k", "4", "--seeds", "2", "--out", "r") == 1
    err = capsys.readouterr().err
    assert "seed 6 control failed (exit code 3)" in err and "failed on purpose" in err
    runs = tmp_path / "r" / "runs"
    assert (runs / "seed5-treatment" / cli.MARKER).exists() and not (runs / "seed6-control" / cli.MARKER).exists()
    first = (runs / "seed5-control" / "record" / "record.rank0.jsonl").stat().st_mtime_ns
    monkeypatch.delenv("FAKE_FAIL")
    assert ab(trainer, "--k", "4", "--seeds", "2", "--out", "r") == 0
    assert (runs / "seed5-control" / "record" / "record.rank0.jsonl").stat().st_mtime_ns == first  # not re-run
    assert (runs / "seed6-treatment" / cli.MARKER).exists()
    # the same --out with other options is refused rather than mixed
    assert ab(trainer, "--k", "8", "--seeds", "2", "--out", "r") == 2
    assert "another command or other options" in capsys.readouterr().err


@pytest.mark.parametrize("own, train, message", [
    (("--k", "1"), (), "--k 1 is the control itself"),
    (("--k", "0"), (), "--k"),
    (("--k", "70000"), (), "--k"),
    (("--k", "4", "--mode", "nearest"), (), "--mode"),
    (("--self_test", "--k", "4"), (), "--self_test runs both arms"),
    (("--k", "4", "--seeds", "0"), (), "--seeds must be at least 1"),
    (("--k", "4"), ("--in_json", "meta.json"), "fine-tuning dataset"),
])
def test_bad_options_are_named(trainer, capsys, own, train, message):
    assert ab(trainer, *own, train=train) == 2
    assert message in capsys.readouterr().err


def test_no_command_and_unknown_trainers_are_refused(trainer, tmp_path, capsys):
    assert cli.main(["--k", "4"]) == 2
    assert "put it after `--`" in capsys.readouterr().err
    other = tmp_path / "my_train.py"
    other.write_text(FAKE_TRAINER)
    assert cli.main(["--k", "4", "--", sys.executable, str(other)]) == 2
    assert "not a trainer this pack patches" in capsys.readouterr().err
    with pytest.raises(plan.PlanError, match="no validation loop"):
        plan.check_trainer("fine_tune.py", {"fine_tune.py"}, True, samples=False)
    assert plan.check_trainer("fine_tune.py", {"fine_tune.py"}, True, samples=True) is False
    with pytest.raises(plan.PlanError, match="8ebe858f"):
        plan.check_trainer("train_network.py", {"train_network.py"}, False, samples=False)


def test_arm_settings_drop_uploads_and_epochs_and_fix_what_must_be_equal(tmp_path):
    base = {"huggingface_repo_id": "me/lora", "async_upload": True, "max_train_epochs": 10, "immiscible_k": 8,
            "learning_rate": 1e-4, "config_file": "x"}
    opts = plan.Options(treatment={"immiscible_k": 4}, seeds=(1,), steps=100)
    s = plan.arm_settings(base, 3, plan.CONTROL, tmp_path, opts, {"validation_seed": 9})
    assert s["immiscible_k"] == 1 and s["seed"] == 3 and s["max_train_steps"] == 100 and s["validation_seed"] == 9
    assert not {"huggingface_repo_id", "async_upload", "max_train_epochs", "config_file"} & set(s)
    assert plan.arm_settings(base, 3, plan.TREATMENT, tmp_path, opts, {})["immiscible_k"] == 4
    text = plan.toml_text({"a": "x \"y\"", "b": [1, 2.5], "c": True, "d": float("inf")})
    assert plan.tomllib.loads(text) == {"a": 'x "y"', "b": [1, 2.5], "c": True, "d": float("inf")}


def test_prompts_get_fixed_seeds_unless_they_have_their_own(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a cat --w 64\n# note\n\nnight --d 7 --s 2\n")
    text, suffix = plan.seeded_prompts(str(p), 100)
    assert suffix == ".txt" and text.splitlines() == ["a cat --w 64 --d 100", "# note", "", "night --d 7 --s 2"]
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y", "seed": 3}, "z --n bad"]))
    out = json.loads(plan.seeded_prompts(str(j), 10)[0])
    assert out == [{"prompt": "x", "seed": 10}, {"prompt": "y", "seed": 3}, "z --n bad --d 12"]


def test_validation_defaults_only_when_the_command_has_none():
    import argparse

    opts = plan.Options(treatment={}, seeds=(), steps=50)
    fixed, notes = plan.validation_settings(argparse.Namespace(), opts, has_split=False, validates=True)
    assert fixed == {"validation_seed": opts.validation_seed, "validation_split": 0.1, "validate_every_n_steps": 10}
    assert len(notes) == 2 and "validation_split = 0.1" in notes[0]
    fixed, notes = plan.validation_settings(argparse.Namespace(validate_every_n_epochs=1), opts, True, True)
    assert fixed == {"validation_seed": opts.validation_seed} and notes == []


def test_report_writes_figures_and_a_sample_sheet(tmp_path):
    from PIL import Image

    from kohya_patch.ab import analysis

    dirs = {}
    for seed in (1, 2, 3):
        for arm, f in ((plan.CONTROL, 1.0), (plan.TREATMENT, 0.99 + 0.005 * seed)):
            d = tmp_path / f"s{seed}{arm}"
            rows = [{"pass": "train", "train_calls": i, "loss": [1], "timesteps": [i], "items": ["x"], "t": i}
                    for i in range(3)]
            rows += [{"pass": "val", "train_calls": c, "loss": [f / c, f], "timesteps": [100, 100], "items": ["a", "b"],
                      "t": 0} for c in (1, 3, 3)]
            (d / "record").mkdir(parents=True)
            (d / "record" / "record.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "model" / "sample").mkdir(parents=True)
            Image.new("RGB", (8, 8), (int(200 * f), 0, 0)).save(d / "model" / "sample" / "lora_000003_00_20261206120000_7.png")
            dirs[(seed, arm)] = d
    res = analysis.analyse(dirs, {k: 1.0 for k in dirs}, self_test=False)
    assert [s for s, _ in res["per_seed"][1]["curve"]["control"]] == [1, 3]   # the repeated pass at 3 counted once
    meta = {"treatment": "--immiscible_k 4", "command": "python train_network.py", "trainer": "train_network.py",
            "version": "test", "steps": 3, "validation_seed": 1, "last": 1, "validation_note": "",
            "wall_arms": 6.0, "runs": 6, "wall_total": 7.0}
    report.write_report(res, meta, tmp_path, dirs)
    for name in ("val_loss.png", "effects.png", "samples.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 100
    text = (tmp_path / "report.md").read_text()
    assert "![the same prompts and seeds" in text and "95 % t-interval (2 df)" in text


def test_recorder_rows_from_the_fake_library(tmp_path, monkeypatch):
    """conditional_loss as process_batch calls it: the per-item loss, the caller's timesteps and latents, and
    validation told apart by the caller's is_train; nothing recorded without the variable."""
    import torch

    with fake_host("sd-scripts", tmp_path / "host", monkeypatch) as sd:
        loss_fn = sd.mods["train_util"].conditional_loss
        assert loss_fn.__wrapped__ is not None

        def process_batch(latents, is_train=True):
            timesteps = torch.tensor([10, 500])
            pred = torch.zeros_like(latents)
            return loss_fn(pred, latents, "l2", "none", None), timesteps

        latents = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
        process_batch(latents)                                  # no IMMISCIBLE_RECORD: nothing written
        monkeypatch.setenv(record.RECORD_ENV, str(tmp_path / "rec"))
        monkeypatch.setattr(record, "_RECORDERS", {})
        out, _ = process_batch(latents)
        process_batch(latents, is_train=False)
        process_batch(latents.flip(0))
    rows = record.read_rows(str(tmp_path / "rec"))
    assert [r["pass"] for r in rows] == ["train", "val", "train"]
    assert [r["train_calls"] for r in rows] == [0, 1, 1]
    assert rows[0]["timesteps"] == [10, 500]
    assert rows[0]["loss"] == pytest.approx(out.mean(dim=(1, 2, 3)).tolist())
    assert rows[2]["items"] == rows[0]["items"][::-1] and rows[0]["items"][0] != rows[0]["items"][1]


def test_ctrl_c_leaves_no_marker_and_the_rerun_restarts_that_arm_from_step_0(trainer, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_sleep = cli.time.sleep

    def interrupted_sleep(s):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        real_sleep(s)

    monkeypatch.setattr(cli.time, "sleep", interrupted_sleep)
    assert ab(trainer, "--k", "4", "--seeds", "1", "--out", "r") == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    arm = tmp_path / "r" / "runs" / "seed5-control"
    assert arm.exists() and not (arm / cli.MARKER).exists() and not (tmp_path / "r" / "results.json").exists()
    (arm / "stale").write_text("from the interrupted run")
    assert ab(trainer, "--k", "4", "--seeds", "1", "--out", "r") == 0
    assert not (arm / "stale").exists() and (arm / cli.MARKER).exists()
    assert len(record.read_rows(str(arm / "record"))) == 4 + 2 * 8        # one run's rows, not two


def test_several_ranks_validate_their_shares_and_the_pass_joins_them(tmp_path):
    from kohya_patch.ab import analysis

    def rows(items, repeat):
        val = [{"pass": "val", "train_calls": 2, "loss": [1.0], "timesteps": [t], "items": [i], "t": 0}
               for i in items for t in (100, 900)]
        return [{"pass": "train", "train_calls": 0, "loss": [1], "timesteps": [5], "items": ["x"], "t": 0}] + val * repeat

    folder = tmp_path / "record"
    folder.mkdir()
    for rank, items in enumerate((["a"], ["b", "c"])):
        (folder / f"record.rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(items, 2)))
    ranks = analysis.rank_rows(str(folder))
    assert len(ranks) == 2
    (step, joined), = analysis.merged_passes(ranks)
    assert step == 2 and [r["items"][0] for r in joined] == ["a", "a", "b", "b", "c", "c"]   # one pass per rank


def test_disk_caches_are_filled_by_a_one_step_warm_up_before_the_arms(trainer, tmp_path):
    train = ("--seed", "5", "--max_train_steps", "4", "--validate_every_n_steps", "2", "--validation_split", "0.25")
    assert ab(trainer, "--k", "4", "--seeds", "1", "--out", "r", train=(*train, "--cache_latents_to_disk")) == 0
    warm = tmp_path / "r" / "runs" / plan.WARMUP
    args = json.loads((warm / "model" / "args.json").read_text())
    assert args["max_train_steps"] == 1 and args["cache_latents_to_disk"] and args["immiscible_k"] == 1
    assert (warm / cli.MARKER).exists() and "warm-up" in (tmp_path / "r" / "report.md").read_text()
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["meta"]["runs"] == 2 and res["per_seed"]["5"]["crn"]["steps"] == [4, 4]
    assert ab(trainer, "--k", "4", "--seeds", "1", "--out", "q", train=train) == 0
    assert not (tmp_path / "q" / "runs" / plan.WARMUP).exists()


def test_without_matplotlib_the_report_says_so_and_has_no_figures(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    res = {"seeds": [1], "per_seed": {}, "effects": [], "interval": None, "mde": None, "overhead": None,
           "reduction": None, "validated": True, "verdict": "v", "self_test": False}
    meta = {"treatment": "t", "command": "c", "trainer": "train_network.py", "version": "x", "steps": 1,
            "validation_seed": 1, "last": 1, "validation_note": "", "wall_arms": 1.0, "runs": 2, "wall_total": 2.0}
    report.write_report(res, meta, tmp_path, {})
    text = (tmp_path / "report.md").read_text()
    assert "matplotlib is not installed" in text and "![" not in text and not list(tmp_path.glob("*.png"))
