"""The report folder: ``results.json``, PNG figures and ``report.md`` with a verdict per objective
and per sampler step count, computed from the runs."""
from __future__ import annotations

import json
import math
import os

from . import plots, stats
from .effect import format_effect_table

QUALITY_LABEL = {"w2": "exact W2 to held-out data", "fd": "Frechet distance, PCA-16 features"}
REPORT_FILES = ("report.md", "results.json", "effect_size.png", "noise_and_cost.png")
PER_DATASET_FILES = ("quality_{}.png", "final_{}.png", "training_{}.png", "samples_{}.png")


def expected_files(datasets) -> list[str]:
    """Every file ``write_report`` produces for these data sets."""
    return list(REPORT_FILES) + [f.format(d) for d in datasets for f in PER_DATASET_FILES]


def _ms(values) -> str:
    m, s = stats.mean_std(values)
    return f"{m:.4g} ± {s:.2g}"


def _fmt(m, s) -> str:
    return f"{m:.4g} ± {s:.2g}"


def summary_lines(rows: list[dict]) -> list[str]:
    """Headline: per (dataset, objective, metric), which arms are better / worse than vanilla."""
    lines = []
    keys = list(dict.fromkeys((r["dataset"], r["objective"], r["metric"]) for r in rows))
    for ds, obj, metric in keys:
        sel = [r for r in rows if (r["dataset"], r["objective"], r["metric"]) == (ds, obj, metric)]
        better = [f"{r['arm']} ({100 * r['rel_change']:+.0f}%)" for r in sel if r["verdict"] == "better"]
        worse = [f"{r['arm']} ({100 * r['rel_change']:+.0f}%)" for r in sel if r["verdict"] == "worse"]
        same = [r["arm"] for r in sel if r["verdict"] == "no significant difference"]
        parts = []
        if better:
            parts.append("**better**: " + ", ".join(better))
        if worse:
            parts.append("**worse**: " + ", ".join(worse))
        if same:
            parts.append("no significant difference: " + ", ".join(same))
        label = metric.replace("quality@", "") + "-step sampler" if metric.startswith("quality@") else metric
        lines.append(f"| {ds} | {obj} | {label} | " + "; ".join(parts) + " |")
    return lines


def render_markdown(result: dict, figures: dict) -> str:
    cfg, env, summary, rows = result["config"], result["environment"], result["summary"], result["verdicts"]
    t = cfg["train"]
    per_ds = "; ".join(f"{d}: {v['steps']} steps, MLP {v['depth']}x{v['hidden']}"
                       for d, v in result["train_per_dataset"].items())
    out = ["# Immiscible diffusion A/B demo", ""]
    how_to_read = [
        ("- Sample quality is a distance between generated samples and held-out data in a fixed space: exact W2 "
         "(optimal assignment) for the 2-D mixture `gmm`, a Frechet distance on PCA-16 features fit on the "
         "training split for `digits`. Lower is better. The *floor* is the same distance between a training "
         "subsample and the held-out set: values near it are limited by the sample size, not the model. For `gmm` "
         "the many-step MMD² (RBF kernel, bandwidth 1) is shown as a second, less biased distance."),
        ("- Verdict per objective and sampler step count: an arm differs from vanilla only when the final "
         "mean ± std intervals over seeds do not overlap; then *steps to reach* is the first checkpoint where the "
         "arm's seed-mean is at or below vanilla's final seed-mean. Welch's p is shown too. With this many "
         "comparisons, expect some spurious differences at 3 seeds: trust patterns, not single cells."),
        "- Straightness gap: mean |x(1 step) − x(most steps)|²/D from the same noise; 0 for a straight flow.",
        ("- Training loss is measured against each arm's own pairing, so it is not comparable across arms; the "
         "held-out loss uses independent noise for every arm."),
    ]
    seeds = f"seeds {cfg['base_seed']}..{cfg['base_seed'] + cfg['seeds'] - 1}"
    out += [
        (f"- date: {env['date']}; machine: {env['processor']}, {env['cpu_count']} CPU cores "
         f"({env['workers']} worker(s) x {env['threads_per_worker']} thread(s)); {env['platform']}; "
         f"torch {env['torch']}, python {env['python']}"),
        f"- command: `{result['command']}`; wall time {result['wall_seconds']:.0f} s",
        (f"- grid: datasets {', '.join(cfg['datasets'])}; objectives {', '.join(cfg['objectives'])}; "
         f"arms {', '.join(cfg['arms'])}; {cfg['seeds']} seeds each ({seeds})"),
        (f"- equal compute: every run of a data set trains the same steps at batch {t['batch_size']} ({per_ds}; "
         f"Adam lr {t['lr']}, EMA {t['ema_decay']}); every arm of a seed shares initial weights, data batches and "
         f"diffusion times; evaluation at {t['evals']} checkpoints from the same {t['eval_samples']} starting "
         f"noises, samplers with {', '.join(map(str, t['sampler_steps']))} steps (DDIM for ddpm, Euler for flow)"),
        "", "## How to read this", "", *how_to_read, ""]
    out += ["## Verdicts", "", "| dataset | objective | metric | verdict vs vanilla |", "|---|---|---|---|"]
    out += summary_lines(rows)
    out.append("")
    for ds, objs in summary.items():
        floor = result["floors"].get(ds)
        out += [f"## {ds}", "", f"Quality metric: {QUALITY_LABEL[result['quality_kind'][ds]]}"
                + (f"; floor (data vs data) {floor:.4g}." if floor is not None else "."), ""]
        for obj, arms in objs.items():
            samplers = list(arms["vanilla"]["quality"])
            has_mmd = all(math.isfinite(v) for e in arms.values() for v in e["mmd"]["final"])
            out += [f"### {ds} / {obj}", "", "Final sample distance (mean ± std over seeds):", "",
                    "| arm | " + " | ".join(f"{s} steps" for s in samplers) + " | straightness gap |"
                    + (f" MMD² ({samplers[-1]} steps) |" if has_mmd else ""),
                    "|---|" + "---:|" * (len(samplers) + 1 + has_mmd)]
            for arm, e in arms.items():
                cells = [_ms(e["quality"][s]["final"]) for s in samplers] + [_ms(e["straightness"]["final"])]
                cells += [_ms(e["mmd"]["final"])] if has_mmd else []
                out.append(f"| {arm} | " + " | ".join(cells) + " |")
            out += ["", "Verdict against vanilla:", "", "| arm | metric | arm | vanilla | Welch p | steps to reach vanilla's final | verdict |",
                    "|---|---|---:|---:|---:|---:|---|"]
            for r in rows:
                if r["dataset"] == ds and r["objective"] == obj:
                    p = f"{r['p_welch']:.3f}" if math.isfinite(r["p_welch"]) else "n/a"
                    reach = r["reach_step"] if r["reach_step"] is not None else "never"
                    out.append(f"| {r['arm']} | {r['metric']} | {_fmt(r['arm_mean'], r['arm_std'])} "
                               f"| {_fmt(r['vanilla_mean'], r['vanilla_std'])} | {p} | {reach} (vanilla {r['vanilla_reach_step']}) "
                               f"| {r['verdict']} ({100 * r['rel_change']:+.1f}%) |")
            out += ["", "Training statistics:", "",
                    "| arm | final train loss | final held-out loss | ‖n‖²/D | ‖x0−n‖²/D | cos(x0, n) | pairing ms/step (demo) | select_noise ms/call (library) |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for arm, e in arms.items():
                lib = result["library_ms"].get(f"{ds}/{arm}")
                out.append(f"| {arm} | {_ms(e['train_loss']['final'])} | {_ms(e['val_loss']['final'])} "
                           f"| {_ms(e['noise_sq_norm'])} | {_ms(e['pair_sq_dist'])} | {_ms(e['pair_cosine'])} "
                           f"| {_ms(e['pairing_ms'])} | {f'{lib:.3g}' if lib is not None else 'n/a'} |")
            out.append("")
        for key in ("quality", "final", "training", "samples"):
            name = figures.get(f"{key}_{ds}")
            if name:
                out += [f"![{key} {ds}]({name})", ""]
    out += ["## Effect size against D and k", "",
            ("`immiscible.select_noise` on standard-normal latents (a latent that looks like noise). "
             "Reduction is of the distance between latent and chosen noise, against the mean over candidates."), "",
            format_effect_table(result["effect"]), "", f"![effect size]({figures['effect_size']})", "",
            f"![noise and cost]({figures['noise_and_cost']})", ""]
    return "\n".join(out)


def write_report(out_dir: str, result: dict, samples: dict, references: dict) -> list[str]:
    """Write every report file into ``out_dir``; returns their paths.

    ``samples[dataset][objective][arm]`` holds the first seed's final samples, ``references[dataset]``
    the held-out points shown beside them.
    """
    os.makedirs(out_dir, exist_ok=True)
    figures = {}
    for ds, objs in result["summary"].items():
        label = QUALITY_LABEL[result["quality_kind"][ds]]
        figures[f"quality_{ds}"] = plots.plot_quality(objs, ds, label, out_dir)
        figures[f"final_{ds}"] = plots.plot_final(objs, ds, out_dir)
        figures[f"training_{ds}"] = plots.plot_training(objs, ds, out_dir)
        figures[f"samples_{ds}"] = plots.plot_samples(samples[ds], ds, references[ds], out_dir)
    figures["noise_and_cost"] = plots.plot_noise_and_cost(result["summary"], result["library_ms"], out_dir)
    figures["effect_size"] = plots.plot_effect(result["effect"], out_dir)
    figures = {k: os.path.basename(v) for k, v in figures.items()}
    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(render_markdown(result, figures))
    js = os.path.join(out_dir, "results.json")
    with open(js, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=_json_default, allow_nan=True)
    return [md, js] + [os.path.join(out_dir, v) for v in figures.values()]


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
