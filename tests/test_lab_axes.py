"""The lab's axes: image data, model families, DDPM schedules and clipping, coarse arms, the
paired statistics and the robustness classification, and --resume."""
import json
import math

import pytest
import torch

import immiscible
from immiscible_lab.experiment import diffusion, stats
from immiscible_lab.experiment.data import image_patches, load_dataset, moment_matched_gaussian
from immiscible_lab.experiment.models import FAMILY_OPTIM, ResMLPDenoiser, build_model, ema_decay_at, ema_update_
from immiscible_lab.experiment.pairing import Arm, pair_noise, parse_arm

pytest.importorskip("scipy")


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("size", [16, 32])
def test_patches_are_fixed_disjoint_and_in_range(size):
    pytest.importorskip("sklearn")
    train, held = image_patches(size)
    again, _ = image_patches(size)
    assert torch.equal(train, again)
    assert train.shape[1] == held.shape[1] == 3 * size * size
    assert held.shape[0] >= 512 and train.shape[0] > 3 * held.shape[0]
    assert train.min() >= -1 and train.max() <= 1
    # no held-out patch is also a training patch (blocks are split, patches never cross a block)
    sample = held[:: max(1, held.shape[0] // 64)]
    assert torch.cdist(sample, train).min() > 0


def test_patch_datasets():
    pytest.importorskip("sklearn")
    d = load_dataset("patches16")
    assert d.shape == (3, 16, 16) and d.dim == 768 and d.family == "patches" and d.side == 16
    assert d.features(d.holdout[:10]).shape == (10, 32) and len(d.bandwidths) == 2
    assert load_dataset("patches16") is d   # cached: workers load each data set once


def test_moment_matched_gaussian_is_seeded():
    d = load_dataset("gmm")
    assert torch.equal(moment_matched_gaussian(d, 8, seed=1), moment_matched_gaussian(d, 8, seed=1))


# --------------------------------------------------------------------------- models and samplers


def test_resmlp_shapes_and_zero_skip_at_init():
    gen = torch.Generator().manual_seed(0)
    net = ResMLPDenoiser(12, hidden=16, depth=2, generator=gen)
    x, t = torch.randn(5, 12), torch.rand(5)
    assert net(x, t).shape == (5, 12)
    assert float(net.skip.weight.detach().abs().sum() + net.skip.bias.detach().abs().sum()) == 0.0
    a = build_model("resmlp", 12, hidden=16, depth=2, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), net.parameters()))
    with pytest.raises(ValueError):
        build_model("unet", 12, hidden=16, depth=2, generator=gen)


def test_schedules():
    sl, cos = diffusion.alpha_bar_for("scaled-linear"), diffusion.alpha_bar_for("cosine")
    assert sl.shape == cos.shape == (1000,)
    assert bool((cos[1:] <= cos[:-1]).all()) and float(cos[0]) > 0.999 and float(cos[-1]) < 1e-6
    assert float(cos[500]) == pytest.approx(math.cos((0.501 + 0.008) / 1.008 * math.pi / 2) ** 2
                                            / math.cos(0.008 / 1.008 * math.pi / 2) ** 2, rel=1e-3)
    with pytest.raises(ValueError):
        diffusion.alpha_bar_for("linear")


def test_ddim_clipping_bounds_the_one_step_sample():
    ab = diffusion.alpha_bar_for("cosine")
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))

    def zero_eps(x, t):     # a poor model: x0_hat = x / sqrt(ab) leaves the data range
        return torch.zeros_like(x)

    free = diffusion.sample_ddim(zero_eps, noise, 1, ab)
    clipped = diffusion.sample_ddim(zero_eps, noise, 1, ab, clip=True)
    assert free.abs().max() > 10 and clipped.abs().max() <= 1.0
    assert diffusion.samplers_for("ddpm", ("off", "on")) == ("ddim", "ddim-clip")


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_clipped_ddim_is_exact_for_a_point_mass_inside_the_range(schedule):
    """Clipping leaves an in-range x0 alone and eps is re-derived from it: the exact field of a
    point mass c in [-1, 1] is still sampled exactly, at any step count."""
    ab = diffusion.alpha_bar_for(schedule)
    c = torch.tensor([[0.5, -0.9, 0.0]])
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))

    def epsilon(x, t):
        a = ab[(t * diffusion.DDPM_T).round().long()][:, None]
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    for steps in (1, 8, 32):
        out = diffusion.sample_ddim(epsilon, noise, steps, ab, clip=True)
        assert torch.allclose(out, c.expand(6, 3), atol=1e-3)
    assert diffusion.samplers_for("flow", ("off", "on")) == ("euler",)


def test_ddim_starts_both_schedules_at_sds_terminal_noise_level():
    sl, cos = diffusion.alpha_bar_for("scaled-linear"), diffusion.alpha_bar_for("cosine")
    assert diffusion.sampling_start(sl) == diffusion.DDPM_T - 1
    start = diffusion.sampling_start(cos)
    assert float(cos[start]) >= float(sl[-1]) > float(cos[start + 1])
    assert diffusion.ddim_timesteps(8, cos)[0] == start and diffusion.ddim_timesteps(8, cos)[-1] > 0


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_unclipped_ddim_tolerates_a_small_model_error(schedule):
    """An eps field off by 1e-3 must not diverge: started at t = T-1 of the cosine schedule
    (alpha_bar 2.4e-9) its x0 estimate would be off by 1e-3 / 5e-5 = 20."""
    ab = diffusion.alpha_bar_for(schedule)
    c = torch.tensor([[0.5, -0.9, 0.0]])
    noise = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))

    def epsilon(x, t):
        a = ab[(t * diffusion.DDPM_T).round().long()][:, None]
        return (x - a.sqrt() * c) / (1 - a).sqrt() + 1e-3

    for steps in (1, 8, 32):
        out = diffusion.sample_ddim(epsilon, noise, steps, ab)
        assert torch.allclose(out, c.expand(6, 3), atol=0.05), (steps, out)


# --------------------------------------------------------------------------- training


def test_bias_corrected_ema_is_the_normalized_exponential_average():
    decay, weights = 0.9, [torch.tensor([float(v)]) for v in (3.0, -1.0, 4.0, 1.0, -5.0)]
    net, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for step, w in enumerate(weights, 1):
        with torch.no_grad():
            net.weight.copy_(w.view(1, 1))
        ema_update_(ema, net, ema_decay_at(step, decay))   # step 1 copies: the initial EMA weight is gone
        n = len(weights[:step])
        expected = sum(decay ** (n - i) * float(weights[i - 1]) for i in range(1, n + 1)) * (1 - decay) / (1 - decay**n)
        assert float(ema.weight.detach()) == pytest.approx(expected, rel=1e-6)
    assert ema_decay_at(10**6, 0.999) == pytest.approx(0.999)


def test_optimizer_settings_default_to_the_model_family():
    from immiscible_lab.experiment.train import TrainConfig, optimizer_settings

    for family, o in FAMILY_OPTIM.items():
        assert optimizer_settings(TrainConfig(), family) == (o["lr"], o["ema_decay"])
    assert optimizer_settings(TrainConfig(lr=5e-4), "resmlp") == (5e-4, FAMILY_OPTIM["resmlp"]["ema_decay"])
    assert optimizer_settings(TrainConfig(ema_decay=0.9), "mlp") == (FAMILY_OPTIM["mlp"]["lr"], 0.9)


def test_beats_gaussian_text_names_the_arms_that_fail():
    from immiscible_lab.experiment.report import beats_gaussian_text

    assert beats_gaussian_text({"vanilla": 1.0, "knn-l2-4": 2.0}, 3.0) == "every arm"
    assert beats_gaussian_text({"vanilla": 1.0, "knn-l2-4": 4.0}, 3.0) == "vanilla; **not** knn-l2-4"
    assert beats_gaussian_text({"vanilla": 4.0, "knn-l2-4": 2.0}, 3.0) == "**not vanilla**"
    assert beats_gaussian_text({"vanilla": 4.0, "a": 2.0, "b": 5.0}, 3.0) == "**not vanilla**; not b"
    assert beats_gaussian_text({"vanilla": 4.0, "knn-l2-4": 5.0}, 3.0) == "**none**"


# --------------------------------------------------------------------------- coarse arms


def test_coarse_arm_is_the_library_selection_on_image_shaped_latents():
    x = torch.randn(6, 3 * 8 * 8, generator=torch.Generator().manual_seed(0))
    arm = parse_arm("knn-coarse4-8")
    ours = pair_noise(x, arm, generator=torch.Generator().manual_seed(5), shape=(3, 8, 8))
    seed = immiscible.draw_seed(torch.Generator().manual_seed(5))
    ref = immiscible.select_noise(x.view(6, 3, 8, 8), 8, seed=seed, coarse=4, backend="torch")
    assert torch.equal(ours, ref.reshape(6, -1))
    # coarse changes the choice, not the candidates: same seed without coarse differs
    plain = pair_noise(x, Arm("knn", 8), generator=torch.Generator().manual_seed(5), shape=(3, 8, 8))
    assert not torch.equal(ours, plain)


def test_coarse_arms_apply_to_images_of_at_least_n():
    assert parse_arm("knn-coarse8-4").applies_to((3, 16, 16))
    assert not parse_arm("knn-coarse8-4").applies_to((1, 8, 8))   # the identity pooling: plain knn
    assert not parse_arm("knn-coarse16-4").applies_to((1, 8, 8))
    assert not parse_arm("knn-coarse2-4").applies_to((2,))
    assert parse_arm("knn-l2-4").applies_to((2,))
    assert parse_arm("knn-coarse8-cosine-4").name == "knn-coarse8-cosine-4"


# --------------------------------------------------------------------------- statistics


def test_benjamini_hochberg_known_values():
    adj = stats.benjamini_hochberg([0.01, 0.04, 0.03, float("nan"), 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): 0.04, 0.06, 0.0533, 0.5, then the running minimum from the top
    assert adj[0] == pytest.approx(0.04) and adj[2] == pytest.approx(0.04 * 4 / 3) and adj[1] == pytest.approx(0.04 * 4 / 3)
    assert math.isnan(adj[3]) and adj[4] == pytest.approx(0.5)


def _cell(arm_vals, van_vals, **axes):
    c = stats.paired_compare(dict(enumerate(arm_vals)), dict(enumerate(van_vals)))
    base = {"dataset": "digits", "objective": "ddpm", "schedule": "scaled-linear", "model": "mlp", "budget": 1000,
            "sampler": "ddim", "metric": "quality@8", "arm": "a"}
    base.update(axes)
    c.update(base)
    return c


def test_robustness_classes():
    van = [1.0, 2.0, 4.0]
    half = [0.5, 1.05, 1.9]
    double = [2.1, 3.9, 8.2]
    same = [1.0, 2.0, 4.0]
    cells = []
    # arm a: better in every cell (two schedules x two budgets)
    for sched in ("scaled-linear", "cosine"):
        for budget in (1000, 4000):
            cells.append(_cell(half, van, schedule=sched, budget=budget, arm="a"))
    # arm b: better at 1000 steps, worse at 4000 (both schedules)
    for sched in ("scaled-linear", "cosine"):
        cells.append(_cell(half, van, schedule=sched, budget=1000, arm="b"))
        cells.append(_cell(double, van, schedule=sched, budget=4000, arm="b"))
    # arm c: nothing
    for sched in ("scaled-linear", "cosine"):
        cells.append(_cell([1.01, 1.98, 4.02], same, schedule=sched, arm="c"))
    rows = {r["arm"]: r for r in stats.robustness(cells, {"digits": "digits"})}
    assert rows["a"]["class"] == "robust-better" and rows["a"]["units"] == 6
    assert rows["b"]["class"] == "depends" and rows["b"]["flips"] == ["budget"]
    assert "depends on budget" in rows["b"]["label"]
    assert rows["c"]["class"] == "none" and rows["c"]["label"].startswith("no effect")


def _report_cells():
    """Robustness rows of a small grid: a robustly better, a depends-on-budget and a no-effect arm, flow and DDPM."""
    van, half, double = [1.0, 2.0, 4.0], [0.5, 1.05, 1.9], [2.1, 3.9, 8.2]
    cells = []
    for obj, sampler in (("flow", "euler"), ("ddpm", "ddim")):
        for metric in ("quality@1", "quality@8"):
            for budget in (1000, 4000):
                for model in ("mlp", "resmlp"):
                    ax = dict(objective=obj, sampler=sampler, metric=metric, budget=budget, model=model,
                              schedule="scaled-linear" if obj == "ddpm" else "-")
                    cells.append(_cell(half, van, arm="knn-l2-4", **ax))
                    cells.append(_cell(half if budget == 1000 else double, van, arm="assign-l2-1", **ax))
                    cells.append(_cell([1.01, 1.98, 4.02], van, arm="knn-cosine-4", **ax))
    for c in cells:
        c["setting"] = f"digits/{c['objective']}" + ("/scaled-linear" if c["objective"] == "ddpm" else "") \
            + f"/{c['model']}"
    return cells, stats.robustness(cells, {"digits": "digits"})


def test_findings_table_leads_with_one_row_per_data_objective_and_steps():
    from immiscible_lab.experiment.report import findings_table

    _, rows = _report_cells()
    table = findings_table(rows)
    assert table[0] == "| data / objective / steps | knn-l2-4 | assign-l2-1 | knn-cosine-4 |"
    body = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table[2:]}
    # flow before DDPM, steps in order; one row each
    assert list(body) == ["digits / flow / 1 step", "digits / flow / 8 steps", "digits / ε-DDPM / 1 step",
                          "digits / ε-DDPM / 8 steps"]
    knn, assign, cosine = body["digits / flow / 8 steps"]
    assert knn.startswith("**−") and knn.endswith("better**")
    assert "depends (budget)" in assign
    assert "*" not in cosine and "%" in cosine


def test_report_tables_read_back_and_figures_draw(tmp_path):
    pytest.importorskip("matplotlib")
    from immiscible_lab.experiment import plots
    from immiscible_lab.experiment.report import read_report_md, robustness_table

    cells, rows = _report_cells()
    text = "\n".join(["- `digits`: MMD; floor 0.001, moment-matched Gaussian 0.0076", "",
                      *robustness_table(rows)])
    back = {(r["objective"], r["metric"], r["arm"]): r for r in read_report_md(text)["robustness"]}
    assert len(back) == len(rows)
    for r in rows:
        b = back[(r["objective"], r["metric"], r["arm"])]
        assert b["class"] == r["class"] and b["flips"] == r["flips"] and b["cells"] == r["cells"]
        assert b["rel_median"] == pytest.approx(r["rel_median"], abs=0.01)
    assert read_report_md(text)["gaussian"] == {"digits": 0.0076}
    summary = plots.plot_summary(rows, str(tmp_path))
    matrix = plots.plot_robustness(rows, cells, str(tmp_path), "digits")
    from PIL import Image

    with Image.open(summary) as im:   # readable at GitHub's width: about 1000 px wide, not a tall strip
        assert 800 <= im.size[0] <= 1300 and im.size[1] < 1.5 * im.size[0]
    with Image.open(matrix) as im:
        assert im.size[0] <= 1300


def test_cells_where_vanilla_fails_the_gaussian_are_left_out():
    van, half, double = [1.0, 2.0, 4.0], [0.5, 1.05, 1.9], [2.1, 3.9, 8.2]
    cells = [_cell(double, van, model=m, budget=b, vanilla_works=True) for m in ("mlp", "resmlp") for b in (1000, 4000)]
    cells += [_cell(half, van, model="mlp", schedule="cosine", budget=b, vanilla_works=False) for b in (1000, 4000)]
    row = stats.robustness(cells, {"digits": "digits"})[0]
    assert row["class"] == "robust-worse" and row["cells"] == 4 and row["excluded"] == 2
    assert "2 left out" in row["label"]
    with_them = [dict(c, vanilla_works=None) for c in cells]   # no Gaussian given: every cell counts
    assert stats.robustness(with_them, {"digits": "digits"})[0]["class"] == "depends"
    none_work = [dict(c, vanilla_works=False) for c in cells]
    row = stats.robustness(none_work, {"digits": "digits"})[0]
    assert row["class"] == "unclassified" and row["cells"] == 0 and "none of its 6 cells" in row["label"]


def test_vanilla_works_reads_vanillas_most_sampler_steps_at_the_budget():
    van = {"seeds": [0, 1], "eval_at": [1000, 4000],
           "quality": {"ddim": {"1": {"per_seed": [[9.0, 9.0], [9.0, 9.0]]},
                                "32": {"per_seed": [[3.0, 1.0], [5.0, 1.5]]}}}}
    assert stats.vanilla_works(van, "ddim", 1000, 3.5) is False      # mean of 3 and 5
    assert stats.vanilla_works(van, "ddim", 4000, 3.5) is True       # mean of 1 and 1.5; 1 step is not read
    assert stats.vanilla_works(van, "ddim", 4000, None) is None


# --------------------------------------------------------------------------- presets and resume


def test_full_preset_covers_every_axis():
    from immiscible_lab.experiment.runner import preset

    cfg = preset("full").validate()
    settings = cfg.settings()
    assert {s.dataset for s in settings} == {"gmm", "digits", "patches16", "patches32"}
    assert {s.schedule for s in settings if s.dataset == "digits"} == {"-", "scaled-linear", "cosine"}
    assert {s.model for s in settings if s.dataset == "digits"} == {"mlp", "resmlp"}
    assert cfg.train.clip == ("off", "on") and all(cfg.train_for(d).budgets for d in cfg.datasets)
    arms = {a for d in cfg.datasets for a in cfg.arms_for(d)}
    assert {"knn-cosine-4", "knn-coarse8-4", "knn-coarse4-4", "assign-l2-1"} <= arms
    assert "knn-coarse8-4" not in cfg.arms_for("digits")   # 8x8 pooling of an 8x8 image is plain knn
    for d in ("patches16", "patches32"):   # the 32-step flow verdicts on patches moved between 3000 and 4500 steps
        t = cfg.train_for(d)
        assert t.steps >= 4500 and set(t.budgets) >= {1000, 3000}


def test_resume_keeps_finished_runs(tmp_path, monkeypatch):
    from immiscible_lab.experiment import runner

    cfg = runner.preset("tiny")
    cfg = runner.replace(cfg, out=str(tmp_path), objectives=("flow",), arms=("vanilla", "knn-l2-4")).validate()
    first = runner.run_grid(cfg)
    lines = (tmp_path / runner.RUNS_FILE).read_text().splitlines()
    assert len(lines) == len(first) == 4 and all("key" in json.loads(x) for x in lines)
    # an interrupted grid: drop the last record and tear the line before it
    (tmp_path / runner.RUNS_FILE).write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    kept = runner.load_finished(str(tmp_path / runner.RUNS_FILE))
    assert len(kept) == 2
    calls = []
    real = runner._run_one
    monkeypatch.setattr(runner, "_run_one", lambda task, progress=None: calls.append(task) or real(task, progress))
    again = runner.run_grid(runner.replace(cfg, resume=True))
    def strip(runs):   # wall-clock fields differ between two trainings of the same run (and NaN != NaN)
        return json.dumps([{k: v for k, v in r.items() if k not in ("train_seconds", "pairing_ms")} for r in runs])

    assert len(calls) == 2 and strip(again) == strip(first)
    assert all(json.dumps(run) in {json.dumps(r) for r in again} for run in kept.values())  # kept as recorded
    # without --resume the grid starts over
    calls.clear()
    runner.run_grid(cfg)
    assert len(calls) == 4


def test_model_cost_benchmark_times_every_family_at_every_shape():
    from immiscible_lab import model_cost

    rows = model_cost.run(shapes=((3, 8, 8),), batch=4, repeats=1)
    assert [r["model"] for r in rows] == list(model_cost.FAMILIES)
    assert all(r["D"] == 192 and r["ms_per_step"] > 0 for r in rows)
    assert [r["vs_resmlp"] for r in rows if r["model"] == "resmlp"] == [1.0]
    conv = model_cost.build("conv", (3, 8, 8))
    assert conv(torch.randn(2, 192), torch.rand(2)).shape == (2, 192)
