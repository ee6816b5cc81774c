"""Aggregation over seeds and the data-computed verdict of each arm against vanilla.

The verdict rule (lower is better for every metric here): an arm and vanilla differ only when
their final ``mean ± std`` intervals (over seeds) do not overlap. "Steps to reach" is the first
evaluation step at which the arm's seed-mean is at or below vanilla's final seed-mean.
"""
from __future__ import annotations

import math

import numpy as np


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def intervals_overlap(m1: float, s1: float, m2: float, s2: float) -> bool:
    """Whether ``[m1 - s1, m1 + s1]`` and ``[m2 - s2, m2 + s2]`` intersect."""
    return abs(m1 - m2) <= s1 + s2


def welch_p(a, b) -> float:
    """Two-sided Welch t-test p-value (NaN when both samples are constant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or b.size < 2 or (a.std() == 0 and b.std() == 0):
        return float("nan")
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def steps_to_reach(eval_at: list[int], curve_mean: list[float], target: float) -> int | None:
    """First evaluation step whose mean is ``<= target``; ``None`` if never."""
    for step, value in zip(eval_at, curve_mean):
        if value <= target:
            return step
    return None


def compare(arm_finals, vanilla_finals, eval_at, arm_curve, vanilla_curve) -> dict:
    """Verdict of one arm against vanilla on one metric (lower is better)."""
    am, asd = mean_std(arm_finals)
    vm, vsd = mean_std(vanilla_finals)
    reach = steps_to_reach(eval_at, arm_curve, vm)
    vreach = steps_to_reach(eval_at, vanilla_curve, vm)
    rel = (am - vm) / abs(vm) if vm else float("nan")
    if intervals_overlap(am, asd, vm, vsd):
        verdict = "no significant difference"
    elif am < vm:
        verdict = "better"
    else:
        verdict = "worse"
    return {"arm_mean": am, "arm_std": asd, "vanilla_mean": vm, "vanilla_std": vsd, "rel_change": rel,
            "p_welch": welch_p(arm_finals, vanilla_finals), "reach_step": reach, "vanilla_reach_step": vreach,
            "verdict": verdict}


def verdict_text(c: dict) -> str:
    """One line, e.g. ``better (-12.3%): reaches vanilla's final quality at step 750 (vanilla: 1500)``."""
    pct = f"{100 * c['rel_change']:+.1f}%" if math.isfinite(c["rel_change"]) else "n/a"
    reach = (f"step {c['reach_step']}" if c["reach_step"] is not None else "never")
    vreach = c["vanilla_reach_step"]
    if c["verdict"] == "no significant difference":
        return f"no significant difference ({pct}; reaches vanilla's final at {reach}, vanilla at step {vreach})"
    return f"{c['verdict']} ({pct}): reaches vanilla's final at {reach} (vanilla at step {vreach})"


def aggregate(runs: list[dict]) -> dict:
    """``summary[dataset][objective][arm]`` with per-seed finals and seed-mean/std curves."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(r["dataset"], {}).setdefault(r["objective"], {}).setdefault(r["arm"], []).append(r)
    summary: dict = {}
    for ds, objs in groups.items():
        for obj, arms in objs.items():
            for arm, rs in arms.items():
                rs = sorted(rs, key=lambda r: r["seed"])
                entry = {"seeds": [r["seed"] for r in rs], "eval_at": rs[0]["eval_at"], "loss_at": rs[0]["loss_at"]}
                for key in ("straightness", "val_loss", "mmd", "train_loss"):
                    entry[key] = _curves([r[key] for r in rs])
                entry["quality"] = {s: _curves([r["quality"][s] for r in rs]) for s in rs[0]["quality"]}
                for key in ("noise_sq_norm", "pair_sq_dist", "pair_cosine", "pairing_ms", "train_seconds"):
                    entry[key] = [r[key] for r in rs]
                summary.setdefault(ds, {}).setdefault(obj, {})[arm] = entry
    return summary


def _curves(per_seed: list[list[float]]) -> dict:
    a = np.asarray(per_seed, dtype=float)
    std = a.std(0, ddof=1) if a.shape[0] > 1 else np.zeros(a.shape[1])
    return {"mean": a.mean(0).tolist(), "std": std.tolist(), "final": a[:, -1].tolist()}


def verdicts(summary: dict) -> list[dict]:
    """Every (dataset, objective, metric, sampler steps, arm) comparison against vanilla."""
    rows = []
    for ds, objs in summary.items():
        for obj, arms in objs.items():
            van = arms.get("vanilla")
            if van is None:
                continue
            metrics = [(f"quality@{s}", s, lambda e, s=s: e["quality"][s]) for s in van["quality"]]
            metrics.append(("straightness", None, lambda e: e["straightness"]))
            for name, sampler, get in metrics:
                for arm, e in arms.items():
                    if arm == "vanilla":
                        continue
                    c = compare(get(e)["final"], get(van)["final"], e["eval_at"], get(e)["mean"], get(van)["mean"])
                    c.update(dataset=ds, objective=obj, metric=name, sampler_steps=sampler, arm=arm,
                             text=verdict_text(c))
                    rows.append(c)
    return rows
