"""Aggregation over seeds, per-cell verdicts against vanilla, and the robustness classification.

Cell verdict (one setting, sampler, sampler step count, training budget and arm): the per-seed
log ratio ``r_s = log(metric(arm, seed s) / metric(vanilla, seed s))`` (lower metric is better,
so r < 0 is better), paired by seed because every arm of a seed shares initial weights, data
batches, diffusion times and evaluation noise. Two-sided paired t-test (one-sample t on r_s);
better / worse when p < 0.05 and the change is at least ``MIN_EFFECT`` (3%), else "n.s." (a
consistent 0.1% difference is real but not worth a verdict). The change shown is the
geometric-mean ratio - 1.

Robustness (one row = data family, objective, metric, arm; its cells = every dataset size, DDPM
schedule, model, budget and DDIM clipping tried):

* **robustly better / worse**: the mean r has the same sign in every cell, and a pooled paired
  t-test is significant after Benjamini-Hochberg over all rows (q = 0.05), with a pooled change of
  at least ``MIN_EFFECT``. Its units are the
  independent trained pairs (seed x dataset x schedule x model; each unit's r is averaged over the
  budgets and samplers read from the same runs).
* **depends on X**: some cell is significantly better and some significantly worse; X names the
  axes along which the sign of the mean r flips between cells that differ only in X.
* **no effect**: neither. The row still says how many cells were better / worse on their own.

Only cells whose model works count: with ``gaussian`` scores given, a cell is left out of its row
when vanilla, at that setting, sampler and budget with the most sampler steps, does not beat the
moment-matched Gaussian (a model that has learned no more than the data's first two moments says
nothing about a pairing). The rule reads vanilla only, never the arm, and the row says how many
cells it left out; a row whose cells are all left out is "not classified".
"""
from __future__ import annotations

import math

import numpy as np

AXES = ("size", "schedule", "model", "budget", "sampler")
ALPHA = 0.05
#: smallest |geometric-mean change| that earns a verdict (log scale: log(1.03))
MIN_EFFECT = math.log(1.03)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def intervals_overlap(m1: float, s1: float, m2: float, s2: float) -> bool:
    """Whether ``[m1 - s1, m1 + s1]`` and ``[m2 - s2, m2 + s2]`` intersect."""
    return abs(m1 - m2) <= s1 + s2


def one_sample_t_p(values) -> float:
    """Two-sided one-sample t-test of mean 0 (= the paired t-test on the differences); NaN when undefined."""
    a = np.asarray(values, float)
    a = a[np.isfinite(a)]
    if a.size < 2:
        return float("nan")
    if a.std() == 0:
        return 0.0 if a.mean() != 0 else 1.0
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(a, 0.0).pvalue)


def benjamini_hochberg(pvalues) -> list[float]:
    """BH-adjusted p-values (NaN stays NaN)."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.where(np.isfinite(p))[0]
    if ok.size:
        order = ok[np.argsort(p[ok])]
        m = ok.size
        adj = p[order] * m / np.arange(1, m + 1)
        adj = np.minimum.accumulate(adj[::-1])[::-1]
        out[order] = np.minimum(adj, 1.0)
    return out.tolist()


def log_ratios(arm_values: dict, vanilla_values: dict) -> list[float]:
    """``log(arm / vanilla)`` per seed present in both ``{seed: value}`` maps (seed order)."""
    out = []
    for s in sorted(set(arm_values) & set(vanilla_values)):
        a, v = arm_values[s], vanilla_values[s]
        out.append(math.log(max(a, 1e-300) / max(v, 1e-300)) if a > 0 and v > 0 else (0.0 if a == v else float("nan")))
    return out


def paired_compare(arm_values: dict, vanilla_values: dict) -> dict:
    """The cell verdict of one arm against vanilla (``{seed: metric}`` each, lower is better)."""
    r = log_ratios(arm_values, vanilla_values)
    finite = [x for x in r if math.isfinite(x)]
    mean_r = float(np.mean(finite)) if finite else float("nan")
    p = one_sample_t_p(r)
    am, asd = mean_std(list(arm_values.values()))
    vm, vsd = mean_std(list(vanilla_values.values()))
    if math.isfinite(p) and p < ALPHA and abs(mean_r) >= MIN_EFFECT:
        verdict = "better" if mean_r < 0 else "worse"
    else:
        verdict = "n.s."
    return {"arm_mean": am, "arm_std": asd, "vanilla_mean": vm, "vanilla_std": vsd, "log_ratios": r,
            "mean_log_ratio": mean_r, "rel_change": math.expm1(mean_r) if math.isfinite(mean_r) else float("nan"),
            "p_paired": p, "verdict": verdict}


# --------------------------------------------------------------------------- aggregation


def setting_key(run: dict) -> str:
    sched = f"/{run['schedule']}" if run["objective"] == "ddpm" else ""
    return f"{run['dataset']}/{run['objective']}{sched}/{run['model']}"


def _curves(per_seed: list[list[float]]) -> dict:
    a = np.asarray(per_seed, dtype=float)
    std = a.std(0, ddof=1) if a.shape[0] > 1 else np.zeros(a.shape[1])
    return {"mean": a.mean(0).tolist(), "std": std.tolist(), "final": a[:, -1].tolist(), "per_seed": a.tolist()}


def aggregate(runs: list[dict]) -> dict:
    """``summary[setting key]`` = ``{"dataset", "objective", "schedule", "model", "arms": {arm: entry}}``.

    Each entry holds the seeds, checkpoints and, per quantity, seed-mean/std curves, finals and
    the per-seed curves (``quality[sampler][steps]``, ``straightness[sampler]``, ``val_loss``,
    ``train_loss``) plus per-seed scalars.
    """
    groups: dict = {}
    for r in runs:
        groups.setdefault(setting_key(r), {}).setdefault(r["arm"], []).append(r)
    summary: dict = {}
    for key, arms in groups.items():
        first = next(iter(arms.values()))[0]
        out = {"dataset": first["dataset"], "objective": first["objective"], "schedule": first["schedule"],
               "model": first["model"], "arms": {}}
        for arm, rs in arms.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            entry = {"seeds": [r["seed"] for r in rs], "eval_at": rs[0]["eval_at"], "loss_at": rs[0]["loss_at"],
                     "val_loss": _curves([r["val_loss"] for r in rs]),
                     "train_loss": _curves([r["train_loss"] for r in rs]),
                     "quality": {sp: {s: _curves([r["quality"][sp][s] for r in rs]) for s in by_steps}
                                 for sp, by_steps in rs[0]["quality"].items()},
                     "straightness": {sp: _curves([r["straightness"][sp] for r in rs]) for sp in rs[0]["straightness"]}}
            for k in ("noise_sq_norm", "pair_sq_dist", "pair_cosine", "pair_cosine_pooled", "pairing_ms", "train_seconds"):
                entry[k] = [r[k] for r in rs]
            out["arms"][arm] = entry
        summary[key] = out
    return summary


def _at(curves: dict, seeds: list, eval_at: list, step: int) -> dict:
    i = eval_at.index(step)
    return {s: row[i] for s, row in zip(seeds, curves["per_seed"])}


def vanilla_works(van: dict, sampler: str, budget: int, gaussian: float | None) -> bool | None:
    """Whether vanilla's mean quality with the most sampler steps at ``budget`` beats ``gaussian``
    (None when no Gaussian score is given)."""
    if gaussian is None:
        return None
    most = max(van["quality"][sampler], key=int)
    per_seed = _at(van["quality"][sampler][most], van["seeds"], van["eval_at"], budget)
    return float(np.mean(list(per_seed.values()))) < gaussian


def cell_verdicts(summary: dict, gaussian: dict | None = None) -> list[dict]:
    """Every (setting, sampler, metric, budget, arm) comparison against vanilla, paired by seed.

    ``metric`` is ``quality@S`` (sample distance with S sampler steps) or ``straightness``
    (flow only); budgets are the checkpoints listed in ``budgets`` of each setting plus the last.
    With ``gaussian`` (dataset -> the moment-matched Gaussian's score) each cell records
    ``vanilla_works`` (:func:`vanilla_works`), which :func:`robustness` reads.
    """
    rows = []
    for key, st in summary.items():
        arms = st["arms"]
        van = arms.get("vanilla")
        if van is None:
            continue
        budgets = st.get("budgets") or [van["eval_at"][-1]]
        for sampler, by_steps in van["quality"].items():
            metrics = [(f"quality@{s}", int(s), lambda e, sp=sampler, s=s: e["quality"][sp][s]) for s in by_steps]
            if st["objective"] == "flow":
                metrics.append(("straightness", None, lambda e, sp=sampler: e["straightness"][sp]))
            for name, steps, get in metrics:
                for budget in budgets:
                    if budget not in van["eval_at"]:
                        continue
                    v = _at(get(van), van["seeds"], van["eval_at"], budget)
                    for arm, e in arms.items():
                        if arm == "vanilla" or budget not in e["eval_at"]:
                            continue
                        c = paired_compare(_at(get(e), e["seeds"], e["eval_at"], budget), v)
                        c.update(setting=key, dataset=st["dataset"], objective=st["objective"],
                                 schedule=st["schedule"], model=st["model"], sampler=sampler, metric=name,
                                 sampler_steps=steps, budget=budget, arm=arm,
                                 vanilla_works=vanilla_works(van, sampler, budget, (gaussian or {}).get(st["dataset"])))
                        rows.append(c)
    return rows


# --------------------------------------------------------------------------- robustness


def _axis_values(cell: dict) -> dict:
    return {"size": cell["dataset"], "schedule": cell["schedule"], "model": cell["model"],
            "budget": cell["budget"], "sampler": cell["sampler"]}


def robustness(cells: list[dict], family: dict) -> list[dict]:
    """Classify every (family, objective, metric, arm) row of ``cells`` (see the module docstring).

    ``family`` maps a dataset to its family (sizes of one family share a row).
    """
    rows: dict = {}
    for c in cells:
        key = (family.get(c["dataset"], c["dataset"]), c["objective"], c["metric"], c["arm"])
        rows.setdefault(key, []).append(c)
    out = []
    for (fam, obj, metric, arm), all_cells in rows.items():
        cs = [c for c in all_cells if c.get("vanilla_works") is not False]
        excluded = len(all_cells) - len(cs)   # a row left with no cell gets NaN statistics: "not classified"
        signs = [np.sign(c["mean_log_ratio"]) for c in cs if math.isfinite(c["mean_log_ratio"])]
        n_better = sum(c["verdict"] == "better" for c in cs)
        n_worse = sum(c["verdict"] == "worse" for c in cs)
        # pooled test: units are independent trained pairs (seed x dataset x schedule x model)
        units: dict = {}
        for c in cs:
            seeds_r = c["log_ratios"]
            for i, r in enumerate(seeds_r):
                if math.isfinite(r):
                    units.setdefault((i, c["dataset"], c["schedule"], c["model"]), []).append(r)
        unit_r = [float(np.mean(v)) for v in units.values()]
        p = one_sample_t_p(unit_r)
        rels = [c["rel_change"] for c in cs if math.isfinite(c["rel_change"])]
        out.append({"family": fam, "objective": obj, "metric": metric, "arm": arm, "cells": len(cs),
                    "excluded": excluded, "n_better": n_better, "n_worse": n_worse, "same_sign": len(set(signs)) == 1 and 0 not in signs,
                    "sign": float(signs[0]) if signs else 0.0, "units": len(unit_r),
                    "pooled_mean_log_ratio": float(np.mean(unit_r)) if unit_r else float("nan"),
                    "p_pooled": p, "rel_min": min(rels) if rels else float("nan"),
                    "rel_max": max(rels) if rels else float("nan"),
                    "rel_median": float(np.median(rels)) if rels else float("nan"),
                    "flips": flip_axes(cs), "cells_detail": cs})
    adjusted = benjamini_hochberg([r["p_pooled"] for r in out])   # NaN rows (no cell) do not count
    for r, q in zip(out, adjusted):
        r["p_bh"] = q
        r["class"], r["label"] = classify(r)
    return out


def flip_axes(cells: list[dict]) -> list[str]:
    """Axes along which the sign of the mean log ratio flips between cells differing only in that axis."""
    flips = []
    for axis in AXES:
        groups: dict = {}
        for c in cells:
            vals = _axis_values(c)
            rest = tuple(v for a, v in vals.items() if a != axis)
            groups.setdefault(rest, []).append(np.sign(c["mean_log_ratio"]))
        if any(1.0 in g and -1.0 in g for g in groups.values()):
            flips.append(axis)
    return flips


def classify(row: dict) -> tuple[str, str]:
    """``(class, label)``: class is robust-better, robust-worse, depends, none or unclassified."""
    if not row["cells"]:
        return "unclassified", (f"not classified (vanilla beats the moment-matched Gaussian in none of its "
                                f"{row.get('excluded', 0)} cells)")
    cells = f"{row['cells']} cell{'s' if row['cells'] != 1 else ''}"
    if row.get("excluded"):
        cells += f"; {row['excluded']} left out: vanilla does not beat the Gaussian there"
    if (row["same_sign"] and math.isfinite(row["p_bh"]) and row["p_bh"] < ALPHA
            and abs(row["pooled_mean_log_ratio"]) >= MIN_EFFECT):
        word = "better" if row["sign"] < 0 else "worse"
        return f"robust-{word}", f"robustly {word} (all {cells})"
    if row["n_better"] and row["n_worse"]:
        axes = ", ".join(row["flips"]) or "the cell"
        return "depends", f"depends on {axes} ({row['n_better']} better, {row['n_worse']} worse of {cells})"
    detail = []
    if row["n_better"]:
        detail.append(f"better in {row['n_better']}")
    if row["n_worse"]:
        detail.append(f"worse in {row['n_worse']}")
    tail = f" ({', '.join(detail)} of {cells}; not robust)" if detail else f" (n.s. in all {cells})"
    return "none", "no robust effect" + tail if detail else "no effect" + tail
