"""The demo's building blocks, and that a run produces every report file."""
import json
import os

import pytest
import torch

import immiscible
from immiscible_lab.experiment import diffusion, stats
from immiscible_lab.experiment.data import gaussian_mixture, load_dataset
from immiscible_lab.experiment.models import MLPDenoiser
from immiscible_lab.experiment.pairing import Arm, pair_noise, parse_arm
from immiscible_lab.experiment.train import TrainConfig, checkpoints, train_run

pytest.importorskip("scipy")


# --------------------------------------------------------------------------- pairing


@pytest.mark.parametrize("mode,k", [("knn", 16), ("assign", 2)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_pair_noise_is_the_library_selection(mode, k, metric):
    latents = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    ours = pair_noise(latents, Arm(mode, k, metric), generator=torch.Generator().manual_seed(5))
    seed = immiscible.draw_seed(torch.Generator().manual_seed(5))
    assert torch.equal(ours, immiscible.select_noise(latents, k, seed=seed, mode=mode, metric=metric,
                                                     backend="torch"))


def test_pair_noise_arms():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    van = pair_noise(x, Arm("vanilla"), generator=torch.Generator().manual_seed(1))
    assert torch.equal(van, torch.randn(32, 8, generator=torch.Generator().manual_seed(1)))
    knn = pair_noise(x, Arm("knn", 64), generator=torch.Generator().manual_seed(1))
    assert (x - knn).square().sum() < (x - van).square().sum()
    perm = pair_noise(x, Arm("assign", 1), generator=torch.Generator().manual_seed(2))
    pool = immiscible.candidates(x, 1, seed=immiscible.draw_seed(torch.Generator().manual_seed(2)), mode="assign")
    # k = 1: a permutation of the batch's own pool
    assert torch.equal(torch.sort(perm.flatten()).values, torch.sort(pool.flatten()).values)


@pytest.mark.parametrize("text, arm", [
    ("vanilla", Arm("vanilla")), ("knn-l2-64", Arm("knn", 64, "l2")), ("knn-cosine-4", Arm("knn", 4, "cosine")),
    ("assign", Arm("assign", 1, "l2")), ("assign-cosine", Arm("assign", 1, "cosine")), ("ASSIGN-l2-2", Arm("assign", 2)),
    ("knn-coarse8-4", Arm("knn", 4, "l2", 8)), ("knn-coarse4-cosine-16", Arm("knn", 16, "cosine", 4)),
    ("assign-coarse4-1", Arm("assign", 1, "l2", 4)), ("assign-coarse2", Arm("assign", 1, "l2", 2)),
])
def test_parse_arm(text, arm):
    assert parse_arm(text) == arm
    assert parse_arm(arm.name) == arm


@pytest.mark.parametrize("bad", ["knn", "knn-l1-4", "knn-l2-0", "random", "", "knn-coarse0-4", "knn-coarse-4"])
def test_parse_arm_rejects(bad):
    with pytest.raises(ValueError):
        parse_arm(bad)


# --------------------------------------------------------------------------- samplers and data


def test_samplers_are_exact_for_the_exact_field_of_a_point_mass():
    c = torch.tensor([[0.5, -1.0, 2.0]])
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    alpha_bar = diffusion.ddpm_alpha_bar()

    def velocity(x, t):      # flow: x_t = (1 - t) c + t n  ->  v = n - c = (x - c) / t
        return (x - c) / t[:, None]

    def epsilon(x, t):       # ddpm: x_t = sqrt(ab) c + sqrt(1 - ab) eps
        ab = alpha_bar[(t * diffusion.DDPM_T).round().long()][:, None]
        return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    for steps in (1, 2, 8):
        assert torch.allclose(diffusion.sample_euler(velocity, noise, steps), c.expand(5, 3), atol=1e-5)
        assert torch.allclose(diffusion.sample_ddim(epsilon, noise, steps, alpha_bar), c.expand(5, 3), atol=1e-4)


def test_alpha_bar_is_sd_scaled_linear():
    ab = diffusion.ddpm_alpha_bar()
    assert ab.shape == (1000,)
    assert float(ab[-1]) == pytest.approx(0.0047, abs=2e-4)


def test_datasets_are_fixed():
    a = gaussian_mixture(100, generator=torch.Generator().manual_seed(0))
    b = gaussian_mixture(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (100, 2)
    gmm = load_dataset("gmm")
    assert gmm.dim == 2 and gmm.quality == "w2"
    with pytest.raises(ValueError):
        load_dataset("cifar")


def test_digits_dataset():
    pytest.importorskip("sklearn")
    d = load_dataset("digits")
    assert d.dim == 64 and d.quality == "mmd" and d.shape == (1, 8, 8) and d.family == "digits"
    assert d.train.min() >= -1 and d.train.max() <= 1
    assert d.train.shape[0] + d.holdout.shape[0] == 1797
    assert d.features(d.holdout).shape == (d.holdout.shape[0], 64)
    # the feature network is a working digit classifier, trained on the training split only
    acc = (d.features.classifier(d.holdout).argmax(1) == d.features.holdout_labels).float().mean()
    assert acc > 0.9


# --------------------------------------------------------------------------- training and verdicts


def test_training_is_seeded_and_leaves_the_global_rng_alone():
    data = load_dataset("gmm")
    cfg = TrainConfig(steps=12, hidden=16, evals=2, eval_samples=32, sampler_steps=(1, 4), log_every=4)
    state = torch.random.get_rng_state()
    r1 = train_run(data, "flow", parse_arm("knn-l2-4"), 3, cfg)
    assert torch.equal(state, torch.random.get_rng_state())
    r2 = train_run(data, "flow", parse_arm("knn-l2-4"), 3, cfg)
    assert r1.quality == r2.quality and r1.train_loss == r2.train_loss
    assert r1.eval_at == [6, 12] and set(r1.quality) == {"euler"} and set(r1.quality["euler"]) == {"1", "4"}
    assert MLPDenoiser(2, hidden=8, generator=torch.Generator().manual_seed(0))(torch.zeros(3, 2), torch.zeros(3)).shape == (3, 2)


def test_checkpoints():
    assert checkpoints(100, 4) == [25, 50, 75, 100]
    assert checkpoints(3, 8) == [1, 2, 3]
    assert checkpoints(100, 2, budgets=(10, 50, 200)) == [10, 50, 100]


def test_paired_verdict_rule():
    van = {0: 1.0, 1: 2.0, 2: 4.0}                       # seeds differ a lot ...
    better = stats.paired_compare({0: 0.5, 1: 1.1, 2: 1.9}, van)   # ... but every seed halves
    assert better["verdict"] == "better" and better["rel_change"] == pytest.approx(-0.49, abs=0.03)
    assert better["p_paired"] < 0.05
    # the same arm values unpaired would overlap vanilla's interval: pairing is what finds it
    assert stats.intervals_overlap(*stats.mean_std([0.5, 1.1, 1.9]), *stats.mean_std([1.0, 2.0, 4.0]))
    worse = stats.paired_compare({0: 1.5, 1: 3.1, 2: 5.9}, van)
    assert worse["verdict"] == "worse"
    mixed = stats.paired_compare({0: 0.5, 1: 4.0, 2: 4.0}, van)
    assert mixed["verdict"] == "n.s."
    tiny = stats.paired_compare({0: 1.001, 1: 2.002, 2: 4.004}, van)  # consistent but 0.1%
    assert tiny["p_paired"] < 0.05 and tiny["verdict"] == "n.s."


# --------------------------------------------------------------------------- the whole demo


@pytest.mark.slow
def test_demo_writes_every_report_file(tmp_path):
    pytest.importorskip("matplotlib")
    from immiscible_lab.__main__ import main
    from immiscible_lab.experiment.report import expected_files

    out = tmp_path / "report"
    assert main(["demo", "--preset", "tiny", "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    for name in expected_files(["gmm"]):
        assert (out / name).is_file() and os.path.getsize(out / name) > 0, name
    result = json.loads((out / "results.json").read_text())
    keys = {(v["objective"], v["metric"]) for v in result["verdicts"]}
    assert keys == ({("ddpm", m) for m in ("quality@1", "quality@2", "quality@8")}
                    | {("flow", m) for m in ("quality@1", "quality@2", "quality@8", "straightness")})
    assert len(result["runs"]) == 2 * 3 * 2
    assert {r["arm"] for r in result["robustness"]} == {"knn-l2-4", "assign-l2-1"}
    assert all(r["class"] in ("robust-better", "robust-worse", "depends", "none", "unclassified")
               for r in result["robustness"])
    text = (out / "report.md").read_text()
    # the report opens with the table of findings (rows data / objective / steps, columns the arms), then details
    assert text.index("## Robust findings") < text.index("| data / objective / steps | knn-l2-4 | assign-l2-1 |") \
        < text.index("## Set-up") < text.index("## Verdicts per cell")
    assert "![summary" in text and "![robustness gmm](robustness_gmm.png)" in text
    assert "moment-matched Gaussian" in text and "floor (data vs data)" in text and "mean ± std" in text
    # the figures of a written report can be drawn again from its report.md alone
    from immiscible_lab.experiment.report import read_report_md

    back = read_report_md(text)
    assert len(back["robustness"]) == len(result["robustness"]) and len(back["verdicts"]) == len(result["verdicts"])
    assert [c["vanilla_works"] for c in back["verdicts"]] == [c["vanilla_works"] for c in result["verdicts"]]
    (out / "summary.png").unlink()
    assert main(["replot", str(out / "report.md"), "--summary", str(tmp_path / "both.png")]) == 0
    assert (out / "summary.png").is_file() and (tmp_path / "both.png").is_file()


@pytest.mark.slow
def test_quick_demo_from_the_command_line_writes_every_report_file(tmp_path):
    """What CI smoke-tests: ``python -m immiscible_lab demo --quick``, run the way a user runs it."""
    import subprocess
    import sys

    from immiscible_lab.experiment.report import expected_files

    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "immiscible_lab", "demo", "--quick", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    datasets = sorted({run["dataset"] for run in result["runs"]})
    assert datasets == ["digits", "gmm"]
    for name in expected_files(datasets):
        assert (out / name).is_file() and os.path.getsize(out / name) > 0, name
    text = (out / "report.md").read_text()
    assert "## Robust findings" in text and "## Verdicts per cell" in text
    # the quick grid exercises every axis the full one has, small: budgets, clipping, a coarse arm
    assert {v["budget"] for v in result["verdicts"] if v["dataset"] == "digits"} == {50, 100}
    assert {v["sampler"] for v in result["verdicts"] if v["objective"] == "ddpm"} == {"ddim", "ddim-clip"}
    assert "knn-coarse4-4" in {v["arm"] for v in result["verdicts"]}
    assert "knn-coarse4-4" not in {r["arm"] for r in result["runs"] if r["dataset"] == "gmm"}


def test_cli_overrides_and_validation():
    from immiscible_lab.__main__ import build_parser, demo_config

    args = build_parser().parse_args(["demo", "--quick", "--steps", "7", "--arms", "vanilla,knn-l2-4",
                                      "--datasets", "gmm", "--sampler-steps", "4,1"])
    default = demo_config(build_parser().parse_args(["demo"]))
    assert default.seeds >= 3 and "knn-coarse4-4" in default.arms and default.objectives == ("ddpm", "flow")
    assert default.train_for("digits").budgets == (1000,) and default.train_for("digits").steps == 3000
    cfg = demo_config(args)
    assert cfg.train_for("gmm").steps == 7 and cfg.arms == ("vanilla", "knn-l2-4") and cfg.seeds == 2
    assert cfg.train.sampler_steps == (1, 4) and cfg.train_for("gmm").budgets == ()
    axes = demo_config(build_parser().parse_args(
        ["demo", "--datasets", "digits,patches16", "--schedules", "cosine,scaled-linear", "--models", "mlp,resmlp",
         "--clip", "on", "--steps", "300", "--budgets", "100,200", "--arms", "vanilla,knn-coarse8-4", "--resume"]))
    assert axes.resume and axes.train_for("digits").budgets == (100, 200) and axes.train_for("patches16").clip == ("on",)
    assert axes.arms_for("digits") == ("vanilla",) and axes.arms_for("patches16") == ("vanilla", "knn-coarse8-4")
    assert len(axes.settings()) == 2 * (2 + 1) * 2
    with pytest.raises(ValueError):
        demo_config(build_parser().parse_args(["demo", "--schedules", "linear"]))
    with pytest.raises(ValueError):
        demo_config(build_parser().parse_args(["demo", "--steps", "100", "--budgets", "200"]))
    with pytest.raises(ValueError):
        demo_config(build_parser().parse_args(["demo", "--arms", "knn-l2-4"]))   # no vanilla
    with pytest.raises(ValueError):
        demo_config(build_parser().parse_args(["demo", "--seeds", "1"]))
    with pytest.raises(ValueError, match=r"--ema-decay must lie in \[0, 1\)"):
        demo_config(build_parser().parse_args(["demo", "--ema-decay", "1"]))   # 1 - 1^step = 0
    with pytest.raises(ValueError, match="--lr must be > 0"):
        demo_config(build_parser().parse_args(["demo", "--lr", "0"]))


def test_effect_command(capsys):
    from immiscible_lab.__main__ import main

    assert main(["effect", "--dims", "2,64", "--ks", "4", "--assign-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") >= 5 and "| 64 | 1x8x8 | knn | l2 | - | 4 |" in out


def test_python_m_immiscible_names_the_lab_command_without_importing_the_lab():
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "try:\n    runpy.run_module('immiscible', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "print(rc, any(m == 'immiscible_lab' or m.startswith('immiscible_lab.') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    assert "python -m immiscible_lab demo" in proc.stderr
