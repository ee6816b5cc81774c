"""The report folder: ``results.json``, ``runs.jsonl``, PNG figures and ``report.md``, which opens
with a table of the robust findings (rows: data / objective / sampler steps; columns: arms) and the
summary figure, then the set-up, the robustness matrices (one per data family), the baselines
(moment-matched Gaussian and data-vs-data floor) and the per-setting tables, all computed from the
runs. :func:`read_report_md` reads the tables of a written ``report.md`` back, so that the figures of
a committed report can be redrawn without its (large, uncommitted) ``results.json``."""
from __future__ import annotations

import json
import math
import os
import re

from . import plots, stats
from .data import FAMILY, dataset_shape
from .effect import format_effect_table
from .models import FAMILY_OPTIM

QUALITY_LABEL = {"w2": "exact W2 to held-out data",
                 "mmd": "MMD² (RBF) on fixed features",
                 "fd": "Frechet distance on fixed features"}
FEATURES_LABEL = {
    "gmm": "exact W2 in data space (D = 2)",
    "digits": "MMD² (RBF, bandwidths 0.5 and 1 x the median distance) on the 64 penultimate features of a "
              "digit classifier trained once on the training split",
    "patches16": "MMD² (RBF, bandwidths 1 and 2 x the median distance) on PCA-32 features of the training "
                 "split, each axis scaled by 1/sqrt(its std)",
    "patches32": "MMD² (RBF, bandwidths 1 and 2 x the median distance) on PCA-32 features of the training "
                 "split, each axis scaled by 1/sqrt(its std)",
}
REPORT_FILES = ("report.md", "results.json", "runs.jsonl", "summary.png", "effect_size.png", "noise_and_cost.png")
PER_DATASET_FILES = ("quality_{}.png", "final_{}.png", "samples_{}.png")
PER_FAMILY_FILES = ("robustness_{}.png",)


def _resumed_text(result: dict) -> str:
    """What of the runs ``--resume`` read from ``runs.jsonl`` (their training is not in this wall time)."""
    n = result.get("resumed_runs", 0)
    if not n:
        return ""
    return (f"; {n} of {len(result['runs'])} runs read from runs.jsonl (`--resume`), not trained in this "
            f"wall time; the runs' own training took {result['run_train_seconds']:.0f} worker-seconds")


def _optim_text(t: dict) -> str:
    """The Adam learning rate and weight EMA of a training configuration (``None``: the model family's)."""
    family = {m: (f"{o['lr']:g}" if t["lr"] is None else f"{t['lr']:g}",
                  f"{o['ema_decay']:g}" if t["ema_decay"] is None else f"{t['ema_decay']:g}")
              for m, o in FAMILY_OPTIM.items()}
    if len(set(family.values())) == 1:
        lr, ema = next(iter(family.values()))
        return f"Adam lr {lr}, bias-corrected weight EMA {ema}"
    return "Adam lr / bias-corrected weight EMA per model family: " + ", ".join(
        f"{m} {lr} / {ema}" for m, (lr, ema) in family.items())


def expected_files(datasets) -> list[str]:
    """Every file ``write_report`` produces for these data sets."""
    families = dict.fromkeys(FAMILY.get(d, d) for d in datasets)
    return (list(REPORT_FILES) + [f.format(d) for d in datasets for f in PER_DATASET_FILES]
            + [f.format(fam) for fam in families for f in PER_FAMILY_FILES])


def _ms(values) -> str:
    m, s = stats.mean_std(values)
    return f"{m:.4g} ± {s:.2g}"


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "n/a"
    return f"{100 * x:+.1f}%" if abs(x) < 0.095 else f"{100 * x:+.0f}%"


def _p(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


def _metric_label(metric: str) -> str:
    return metric.replace("quality@", "") + "-step" if metric.startswith("quality@") else metric


def _metric_lead(metric: str) -> tuple:
    return (metric == "straightness", int(metric.split("@")[1]) if "@" in metric else 0)


_OBJECTIVE_NAME = {"flow": "flow", "ddpm": "ε-DDPM"}


def _row_order(robust: list[dict]):
    """Sort key of robustness rows: data family as first seen, flow before DDPM, steps, straightness last."""
    families = list(dict.fromkeys(r["family"] for r in robust))
    return lambda r: (families.index(r["family"]), r["objective"] != "flow", _metric_lead(r["metric"]))


def findings_cell(row: dict | None) -> str:
    """One cell of :func:`findings_table`: the median change over the row's cells and its class."""
    if row is None:
        return "—"
    cls = row["class"]
    if cls == "unclassified":
        return "left out"
    pct = _pct(row["rel_median"]).replace("-", "−")
    if cls == "robust-better":
        return f"**{pct} better**"
    if cls == "robust-worse":
        return f"**{pct} worse**"
    if cls == "depends":
        return f"{pct} depends ({', '.join(row.get('flips') or []) or 'cell'})"
    return f"{pct}"


def findings_table(robust: list[dict]) -> list[str]:
    """The compact table a report opens with: rows data / objective / sampler steps (and straightness),
    columns the arms, cells the median change against vanilla and the class (bold: robust)."""
    if not robust:
        return ["No robustness row: the grid has no arm besides vanilla."]
    arms = list(dict.fromkeys(r["arm"] for r in robust))
    by_key: dict = {}
    for r in sorted(robust, key=_row_order(robust)):
        by_key.setdefault((r["family"], r["objective"], r["metric"]), {})[r["arm"]] = r
    out = ["| data / objective / steps | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for (fam, obj, metric), row in by_key.items():
        steps = metric.split("@")[1] if metric.startswith("quality@") else None
        what = "straightness" if steps is None else f"{steps} step" + ("" if steps == "1" else "s")
        out.append(f"| {fam} / {_OBJECTIVE_NAME.get(obj, obj)} / {what} | "
                   + " | ".join(findings_cell(row.get(a)) for a in arms) + " |")
    return out


FINDINGS_LEGEND = (
    "Each cell: the median change of the sample distance against vanilla over the row's cells (every size, DDPM "
    "schedule, model, training budget and DDIM clipping tried; negative is better), then the class: **bold** = "
    "robust (one sign in every cell and a significant pooled paired test after Benjamini-Hochberg); *depends (X)* = "
    "significantly better in one cell and worse in another, the sign flipping along X; a bare number = no robust "
    "effect; *left out* = vanilla beats the moment-matched Gaussian in none of its cells; — = arm not run there. "
    "Straightness: ‖x(1 step) − x(most steps)‖²/D, lower is straighter. The rules, ranges and p-values are under "
    "[Robust findings: details](#robust-findings-details).")


def summary_lines(rows: list[dict]) -> list[str]:
    """Headline table rows: per (setting, sampler, metric, budget), which arms are better / worse than vanilla."""
    lines = []
    keys = list(dict.fromkeys((r["setting"], r["sampler"], r["metric"], r["budget"]) for r in rows))
    for setting, sampler, metric, budget in keys:
        sel = [r for r in rows if (r["setting"], r["sampler"], r["metric"], r["budget"]) == (setting, sampler, metric, budget)]
        better = [f"{r['arm']} ({_pct(r['rel_change'])})" for r in sel if r["verdict"] == "better"]
        worse = [f"{r['arm']} ({_pct(r['rel_change'])})" for r in sel if r["verdict"] == "worse"]
        same = [r["arm"] for r in sel if r["verdict"] == "n.s."]
        parts = []
        if better:
            parts.append("**better**: " + ", ".join(better))
        if worse:
            parts.append("**worse**: " + ", ".join(worse))
        if same:
            parts.append("n.s.: " + ", ".join(same))
        lines.append(f"| {setting} | {sampler} | {_metric_label(metric)} | {budget} | " + "; ".join(parts) + " |")
    return lines


def robustness_table(robust: list[dict]) -> list[str]:
    out = ["| data | objective | metric | arm | class | cells better / worse / n.s. (left out) "
           "| change (median, range) | pooled p (BH) | sign flips along |", "|---|---|---|---|---|---|---|---:|---|"]
    order = {"robust-better": 0, "robust-worse": 1, "depends": 2, "none": 3, "unclassified": 4}
    for r in sorted(robust, key=lambda r: (order[r["class"]], r["family"], r["objective"], r["arm"],
                                           _metric_lead(r["metric"]))):
        ns = r["cells"] - r["n_better"] - r["n_worse"]
        cls = {"robust-better": "**robustly better**", "robust-worse": "**robustly worse**",
               "depends": "depends"}.get(r["class"], r["label"].split(" (")[0])
        out.append(f"| {r['family']} | {r['objective']} | {_metric_label(r['metric'])} | {r['arm']} | {cls} "
                   f"| {r['n_better']} / {r['n_worse']} / {ns} ({r.get('excluded', 0)}) | {_pct(r['rel_median'])} ({_pct(r['rel_min'])} to "
                   f"{_pct(r['rel_max'])}) | {_p(r['p_bh'])} | {', '.join(r['flips']) or '-'} |")
    return out


def beats_gaussian_text(means: dict, gaussian: float) -> str:
    """Which of ``{arm: mean quality}`` (lower is better) beat the Gaussian's score: every arm, some, or none."""
    failing = [a for a, m in means.items() if not m < gaussian]
    if not failing:
        return "every arm"
    if len(failing) == len(means):
        return "**none**"
    if "vanilla" in failing:
        others = [a for a in failing if a != "vanilla"]
        return "**not vanilla**" + (f"; not {', '.join(others)}" if others else "")
    return "vanilla; **not** " + ", ".join(failing)


def baseline_lines(result: dict) -> list[str]:
    """Does every arm beat the moment-matched Gaussian? One row per setting and sampler, most steps, last checkpoint.

    Vanilla beating it shows that the model works; an arm that does not, where vanilla does, is a finding about
    that arm.
    """
    out = ["| setting | sampler | steps | floor (data vs data) | moment-matched Gaussian | vanilla | best arm "
           "| worst arm | beats the Gaussian |", "|---|---|---:|---:|---:|---:|---|---|---|"]
    for key, st in result["summary"].items():
        ds = st["dataset"]
        g, f = result["gaussian"][ds], result["floors"][ds]
        for sampler in st["arms"]["vanilla"]["quality"]:
            steps = max(st["arms"]["vanilla"]["quality"][sampler], key=int)
            means = {a: stats.mean_std(e["quality"][sampler][steps]["final"])[0] for a, e in st["arms"].items()}
            best, worst = min(means, key=means.get), max(means, key=means.get)
            out.append(f"| {key} | {sampler} | {steps} | {f:.4g} | {g:.4g} | {means['vanilla']:.4g} "
                       f"| {best} {means[best]:.4g} | {worst} {means[worst]:.4g} | {beats_gaussian_text(means, g)} |")
    return out


def setting_tables(result: dict, key: str, st: dict) -> list[str]:
    ds = st["dataset"]
    g, f = result["gaussian"][ds], result["floors"][ds]
    arms = st["arms"]
    out = [f"### {key}", ""]
    for sampler in arms["vanilla"]["quality"]:
        samplers = list(arms["vanilla"]["quality"][sampler])
        out += [f"Sampler `{sampler}`, last checkpoint ({arms['vanilla']['eval_at'][-1]} steps), mean ± std over seeds "
                f"(lower is better):", "",
                "| arm | " + " | ".join(f"{s} steps" for s in samplers) + " | straightness gap |",
                "|---|" + "---:|" * (len(samplers) + 1)]
        for arm, e in arms.items():
            cells = [_ms(e["quality"][sampler][s]["final"]) for s in samplers] + [_ms(e["straightness"][sampler]["final"])]
            out.append(f"| {arm} | " + " | ".join(cells) + " |")
        out.append("| *moment-matched Gaussian* | " + " | ".join(f"{g:.4g}" for _ in samplers) + " | |")
        out.append("| *floor (data vs data)* | " + " | ".join(f"{f:.4g}" for _ in samplers) + " | |")
        out.append("")
    rows = [r for r in result["verdicts"] if r["setting"] == key]
    if rows:
        out += ["Against vanilla, paired by seed (change = geometric-mean ratio − 1; paired t on log ratios):", "",
                "| sampler | metric | budget | arm | arm | vanilla | change | paired p | verdict |",
                "|---|---|---:|---|---:|---:|---:|---:|---|"]
        for r in rows:
            out.append(f"| {r['sampler']} | {_metric_label(r['metric'])} | {r['budget']} | {r['arm']} "
                       f"| {r['arm_mean']:.4g} ± {r['arm_std']:.2g} | {r['vanilla_mean']:.4g} ± {r['vanilla_std']:.2g} "
                       f"| {_pct(r['rel_change'])} | {_p(r['p_paired'])} | {r['verdict']} |")
        out.append("")
    out += ["Training statistics:", "",
            "| arm | final train loss | final held-out loss | ‖n‖²/D | ‖x0−n‖²/D | cos(x0, n) | cos pooled 4×4 "
            "| pairing ms/step | select_noise ms/call (library) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, e in arms.items():
        lib = result["library_ms"].get(f"{ds}/{arm}")
        pooled = _ms(e["pair_cosine_pooled"]) if all(math.isfinite(v) for v in e["pair_cosine_pooled"]) else "n/a"
        out.append(f"| {arm} | {_ms(e['train_loss']['final'])} | {_ms(e['val_loss']['final'])} "
                   f"| {_ms(e['noise_sq_norm'])} | {_ms(e['pair_sq_dist'])} | {_ms(e['pair_cosine'])} | {pooled} "
                   f"| {_ms(e['pairing_ms'])} | {f'{lib:.3g}' if lib is not None else 'n/a'} |")
    out.append("")
    return out


def render_markdown(result: dict, figures: dict) -> str:
    cfg, env, summary = result["config"], result["environment"], result["summary"]
    t = cfg["train"]
    load = env.get("load_average")
    load_text = f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)" if load else ""
    per_ds = "; ".join(f"{d}: {v['steps']} steps (read at {', '.join(map(str, sorted(set(v['budgets']) | {v['steps']})))}), "
                       f"width {v['hidden']}, depth {v['depth']}, {v['eval_samples']} evaluation samples"
                       for d, v in result["train_per_dataset"].items())
    out = ["# Immiscible diffusion A/B demo", "",
           f"`{result['command']}`: {len(result['runs'])} runs, wall time {result['wall_seconds']:.0f} s "
           f"({env['date']}; details under [Set-up](#set-up)).", "",
           "## Robust findings", ""]
    out += findings_table(result["robustness"])
    out += ["", FINDINGS_LEGEND, ""]
    if figures.get("summary"):
        out += [f"![summary: change against vanilla per objective and sampler steps]({figures['summary']})", ""]
    out += ["## Set-up", "",
            (f"- date: {env['date']}; machine: {env['processor']}, {env['cpu_count']} CPU cores "
             f"({env['workers']} worker(s) x {env['threads_per_worker']} thread(s)){load_text}; {env['platform']}; "
             f"torch {env['torch']}, python {env['python']}"),
            f"- command: `{result['command']}`; wall time {result['wall_seconds']:.0f} s "
            f"(training {result['train_wall_seconds']:.0f} s)" + _resumed_text(result),
            f"- settings: {', '.join(summary)}",
            "- arms: " + "; ".join(f"{d}: {', '.join(a)}" for d, a in _arms_by_dataset(result).items()),
            (f"- equal compute: {per_ds}; batch {t['batch_size']}, {_optim_text(t)}; every "
             f"arm of a seed shares initial weights, data batches and diffusion times; evaluation from the same "
             f"starting noises with {', '.join(map(str, t['sampler_steps']))} sampler steps (Euler for flow; DDIM for "
             f"ddpm with x0 clipping {' and '.join(t['clip'])})"),
            "", "## Robust findings: details", "",
            ("Each row is one (data, objective, sampler steps, arm), its cells every dataset size, DDPM schedule, "
             "model, training budget and DDIM clipping tried. *Robustly better/worse*: the paired (same-seed) change "
             "against vanilla has one sign in every cell and a pooled paired t-test over the independent trained "
             "pairs is significant after Benjamini-Hochberg across all rows (q = 0.05). *Depends on X*: "
             "significantly better in some cell and significantly worse in another (paired t on the seeds of that "
             "cell, p < 0.05); X names the axes along which the sign flips. Only cells whose model works count: a "
             "cell is left out where vanilla (at that setting, sampler and budget, with the most sampler steps) does "
             "not beat the moment-matched Gaussian; the rule reads vanilla only, never the arm."), ""]
    out += robustness_table(result["robustness"])
    out += [""]
    for name in sorted(k for k in figures if k.startswith("robustness_")):
        out += [f"![{name.replace('_', ' ')}]({figures[name]})", ""]
    out += ["## Baselines: does every arm beat the moment-matched Gaussian?", "",
            ("The quality metric must tell a model from a Gaussian with the data's mean and covariance. "
             "Floor: a training subsample against the held-out set (the best a model can score at this sample size). "
             "Gaussian: the moment-matched Gaussian against the held-out set. Most sampler steps, last checkpoint. "
             "Vanilla beating the Gaussian shows that the model works; an arm that does not, where vanilla does, "
             "is a finding about that arm."), ""]
    out += baseline_lines(result)
    out += ["", "Quality metrics:", ""]
    out += [f"- `{d}`: {FEATURES_LABEL.get(d, QUALITY_LABEL[result['quality_kind'][d]])}; floor "
            f"{result['floors'][d]:.4g}, moment-matched Gaussian {result['gaussian'][d]:.4g}" for d in result["floors"]]
    out += ["", "## Verdicts per cell", "", "| setting | sampler | metric | budget | verdict vs vanilla (paired t, p < 0.05) |",
            "|---|---|---|---:|---|"]
    out += summary_lines(result["verdicts"])
    out.append("")
    for ds in dict.fromkeys(st["dataset"] for st in summary.values()):
        out += [f"## {ds}", ""]
        for key, st in summary.items():
            if st["dataset"] == ds:
                out += setting_tables(result, key, st)
        for kind in ("quality", "final", "samples"):
            name = figures.get(f"{kind}_{ds}")
            if name:
                out += [f"![{kind} {ds}]({name})", ""]
    out += ["## Effect size against D and k", "",
            ("`immiscible.select_noise` on standard-normal latents shaped as images (D = 64: 1x8x8, 768: 3x16x16, "
             "3072: 3x32x32, 16384: 4x64x64, 65536: 16x64x64, 262144: 16x128x128). Reduction is of the distance "
             "between latent and chosen noise, against the mean over candidates, in the full space; the pooled "
             "cosine is between noise and latent after both are average-pooled to N x N (N = the row's coarse, else 8)."),
            "", format_effect_table(result["effect"]), "", f"![effect size]({figures['effect_size']})", "",
            f"![noise and cost]({figures['noise_and_cost']})", ""]
    return "\n".join(out)


def _arms_by_dataset(result: dict) -> dict:
    out: dict = {}
    for st in result["summary"].values():
        out.setdefault(st["dataset"], list(st["arms"]))
    return out


def write_report(out_dir: str, result: dict, samples: dict, references: dict) -> list[str]:
    """Write every report file into ``out_dir``; returns their paths.

    ``samples[setting key][arm]`` holds the first seed's final samples, ``references[dataset]``
    held-out samples shown beside them.
    """
    os.makedirs(out_dir, exist_ok=True)
    figures = {}
    summary = result["summary"]
    for ds in dict.fromkeys(st["dataset"] for st in summary.values()):
        label = QUALITY_LABEL[result["quality_kind"][ds]]
        figures[f"quality_{ds}"] = plots.plot_quality(summary, ds, label, result["gaussian"][ds], result["floors"][ds],
                                                      out_dir)
        figures[f"final_{ds}"] = plots.plot_final(summary, ds, out_dir)
        figures[f"samples_{ds}"] = plots.plot_samples(samples, ds, dataset_shape(ds), references[ds], out_dir)
    figures.update(draw_robustness_figures(result["robustness"], result["verdicts"], out_dir))
    figures["noise_and_cost"] = plots.plot_noise_and_cost(summary, result["library_ms"], out_dir)
    figures["effect_size"] = plots.plot_effect(result["effect"], out_dir)
    figures = {k: os.path.basename(v) for k, v in figures.items()}
    md = os.path.join(out_dir, "report.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(render_markdown(result, figures))
    js = os.path.join(out_dir, "results.json")
    with open(js, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=_json_default, allow_nan=True)
    return [md, js, os.path.join(out_dir, "runs.jsonl")] + [os.path.join(out_dir, v) for v in figures.values()]


def draw_robustness_figures(robust: list[dict], cells: list[dict], out_dir: str, families=None) -> dict:
    """The summary figure and one robustness matrix per data family: ``{figure key: path}``."""
    families = list(dict.fromkeys(families or [])) or plots.robustness_families(robust)
    out = {"summary": plots.plot_summary(robust, out_dir)}
    for fam in families:
        out[f"robustness_{fam}"] = plots.plot_robustness(robust, cells, out_dir, fam)
    return out


# --------------------------------------------------------------------------- reading a written report back

_CLASS_OF = {"**robustly better**": "robust-better", "**robustly worse**": "robust-worse", "depends": "depends",
             "no effect": "none", "no robust effect": "none", "not classified": "unclassified"}


def _parse_pct(text: str) -> float:
    text = text.strip().replace("−", "-")
    return float(text.rstrip("%")) / 100 if text not in ("n/a", "") else float("nan")


def _parse_metric(text: str) -> str:
    return f"quality@{text.split('-')[0]}" if text.endswith("-step") else text


def _table_rows(lines: list[str], start: int) -> list[list[str]]:
    """The body rows of the Markdown table whose header is ``lines[start]``, as lists of cell texts."""
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def read_report_md(text: str) -> dict:
    """The robustness rows, per-cell verdicts and Gaussian scores of a ``report.md`` this module wrote.

    Returns ``{"robustness": rows, "verdicts": cells, "gaussian": {dataset: score}}`` with the fields
    :func:`plots.plot_summary` and :func:`plots.plot_robustness` read. Numbers come from the tables'
    rounding (changes to 2 significant digits), which the figures do not resolve; ``vanilla_works`` of
    a cell is recomputed from vanilla's mean with the most sampler steps at the cell's budget.
    """
    from .data import FAMILY

    lines = text.splitlines()
    gaussian = {}
    for line in lines:
        m = re.match(r"- `([\w-]+)`: .*moment-matched Gaussian ([0-9.eE+-]+)$", line)
        if m:
            gaussian[m.group(1)] = float(m.group(2))
    robust = []
    cells = []
    setting = None
    for i, line in enumerate(lines):
        if line.startswith("| data | objective | metric | arm | class |"):
            for c in _table_rows(lines, i):
                counts = re.match(r"(\d+) / (\d+) / (\d+) \((\d+)\)", c[5])
                change = re.match(r"(\S+) \((\S+) to (\S+)\)", c[6])
                n_b, n_w, n_ns, excl = (int(x) for x in counts.groups())
                robust.append({"family": c[0], "objective": c[1], "metric": _parse_metric(c[2]), "arm": c[3],
                               "class": _CLASS_OF[c[4]], "n_better": n_b, "n_worse": n_w,
                               "cells": n_b + n_w + n_ns, "excluded": excl,
                               "rel_median": _parse_pct(change.group(1)), "rel_min": _parse_pct(change.group(2)),
                               "rel_max": _parse_pct(change.group(3)),
                               "p_bh": float(c[7]) if c[7] != "n/a" else float("nan"),
                               "flips": [] if c[8] == "-" else [x.strip() for x in c[8].split(",")]})
        elif line.startswith("### "):
            setting = line[4:].strip()
        elif line.startswith("| sampler | metric | budget | arm | arm | vanilla |") and setting:
            parts = setting.split("/")
            dataset, objective, model = parts[0], parts[1], parts[-1]
            schedule = parts[2] if objective == "ddpm" else "-"
            for c in _table_rows(lines, i):
                rel = _parse_pct(c[6])
                cells.append({"setting": setting, "dataset": dataset, "objective": objective, "schedule": schedule,
                              "model": model, "sampler": c[0], "metric": _parse_metric(c[1]), "budget": int(c[2]),
                              "arm": c[3], "vanilla_mean": float(c[5].split(" ± ")[0]), "rel_change": rel,
                              "mean_log_ratio": math.log1p(rel) if rel > -1 else float("nan"),
                              "verdict": c[8]})
    most = {}
    for c in cells:
        if c["metric"].startswith("quality@"):
            key = (c["setting"], c["sampler"], c["budget"])
            steps = int(c["metric"].split("@")[1])
            if steps >= most.get(key, (0, 0.0))[0]:
                most[key] = (steps, c["vanilla_mean"])
    for c in cells:
        g = gaussian.get(c["dataset"])
        v = most.get((c["setting"], c["sampler"], c["budget"]))
        c["vanilla_works"] = None if g is None or v is None else v[1] < g
    for r in robust:
        r.setdefault("series", r["family"])
    # the run's order (data sets and arms as configured), not the classification table's
    fam_order = list(dict.fromkeys(FAMILY.get(c["dataset"], c["dataset"]) for c in cells))
    arm_order = list(dict.fromkeys(c["arm"] for c in cells))
    robust.sort(key=lambda r: (fam_order.index(r["family"]) if r["family"] in fam_order else len(fam_order),
                               arm_order.index(r["arm"]) if r["arm"] in arm_order else len(arm_order)))
    return {"robustness": robust, "verdicts": cells, "gaussian": gaussian,
            "families": list(dict.fromkeys(FAMILY.get(c["dataset"], c["dataset"]) for c in cells))}


def redraw(report_md: str, out_dir: str | None = None) -> list[str]:
    """Draw the summary figure and the per-family robustness matrices of a written ``report.md`` again,
    from its tables, into ``out_dir`` (default: the report's folder); returns the paths."""
    with open(report_md, encoding="utf-8") as f:
        parsed = read_report_md(f.read())
    out_dir = out_dir or os.path.dirname(os.path.abspath(report_md))
    os.makedirs(out_dir, exist_ok=True)
    return list(draw_robustness_figures(parsed["robustness"], parsed["verdicts"], out_dir,
                                        parsed["families"]).values())


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


__all__ = ["FAMILY", "expected_files", "findings_table", "read_report_md", "redraw", "render_markdown",
           "summary_lines", "write_report"]
