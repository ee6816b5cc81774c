"""From the arms' records (:mod:`immiscible_host.record`) to the A/B's results (a JSON-ready dict).

A validation *pass* is the run of validation rows recorded after the same number of training calls
that starts with the pass's first (batch, timestep); when sd-scripts validates twice at one step
(its step schedule and the epoch end), the passes are equal and the last one counts.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from immiscible_host import abtest
from immiscible_host.record import read_rows

from .plan import CONTROL, TREATMENT


NO_LOSSES = ("No validation loss was recorded (samples only: this trainer or sd-scripts version has no validation "
             "loss), so there is no verdict; compare the sample sheet.")


def _key(row) -> tuple:
    return tuple(row.get("items") or ()), tuple(row.get("timesteps") or ())


def validation_passes(rows, grad_accum: int = 1) -> list[tuple[int, list[dict]]]:
    """``[(step, rows of the last pass at that step)]`` in step order."""
    by_calls: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r["pass"] == "val":
            by_calls[r["train_calls"]].append(r)
    out = []
    for calls in sorted(by_calls):
        group = by_calls[calls]
        first = _key(group[0])
        starts = [i for i, r in enumerate(group) if _key(r) == first]
        out.append((calls // max(1, grad_accum), group[starts[-1]:]))
    return out


def merged_passes(ranks, grad_accum: int = 1) -> list[tuple[int, list[dict]]]:
    """:func:`validation_passes` of each rank's rows, a step's rows of every rank joined (with several
    processes each validates its share of the validation set)."""
    steps: dict[int, list[dict]] = {}
    for rows in ranks:
        for step, rs in validation_passes(rows, grad_accum):
            steps.setdefault(step, []).extend(rs)
    return sorted(steps.items())


def rank_rows(folder) -> list[list[dict]]:
    """Every rank's recorded rows in ``folder`` (rank 0 first; none: ``[[]]``)."""
    out, rank = [], 0
    while True:
        rows = read_rows(folder, rank)
        if not rows and rank > 0:
            return out
        out.append(rows)
        if not rows:
            return out
        rank += 1


def flat(rows, field: str) -> list:
    return [v for r in rows for v in (r.get(field) or [])]


def pass_loss(rows) -> float:
    return float(np.mean(flat(rows, "loss")))


def train_rows(rows) -> list[dict]:
    return [r for r in rows if r["pass"] == "train"]


def step_seconds(rows) -> list[float]:
    """Each training step's seconds (from the previous recorded call: validation passes left out)."""
    return abtest.step_durations([r["t"] for r in rows], [r["pass"] == "train" for r in rows]).tolist()


def crn_check(control_rows, treatment_rows) -> dict:
    """Whether the two arms trained on the same timesteps and the same images in the same order."""
    c, t = train_rows(control_rows), train_rows(treatment_rows)
    same_t = [r.get("timesteps") for r in c] == [r.get("timesteps") for r in t]
    same_i = [r.get("items") for r in c] == [r.get("items") for r in t]
    return {"steps": [len(c), len(t)], "same_timesteps": same_t and len(c) == len(t),
            "same_images": same_i and len(c) == len(t)}


def mean_reduction(dump_dir) -> float | None:
    """Mean ``immiscible/reduction`` over the selections a run dumped (None: nothing selected)."""
    path = os.path.join(dump_dir, "rank0.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            vals = [json.loads(line)["reduction"] for line in f if line.strip()]
    except (OSError, ValueError, KeyError):
        return None
    return float(np.mean(vals)) if vals else None


def seed_result(control_ranks, treatment_ranks, last: int = 1, grad_accum: int = 1) -> dict:
    """One seed from each arm's rows per rank: ``d_s`` over its last ``last`` validation passes, its curves,
    per-timestep losses and checks (common random numbers and step times from rank 0)."""
    cp, tp = merged_passes(control_ranks, grad_accum), merged_passes(treatment_ranks, grad_accum)
    control_rows, treatment_rows = control_ranks[0], treatment_ranks[0]
    out = {"curve": {CONTROL: [(s, pass_loss(r)) for s, r in cp], TREATMENT: [(s, pass_loss(r)) for s, r in tp]},
           "crn": crn_check(control_rows, treatment_rows),
           "step_s": {CONTROL: step_seconds(control_rows), TREATMENT: step_seconds(treatment_rows)}}
    if not cp or not tp:
        out["d"] = None
        return out
    cr = [r for _, rows in cp[-last:] for r in rows]
    tr = [r for _, rows in tp[-last:] for r in rows]
    out["same_validation_items"] = [_key(r) for r in cr] == [_key(r) for r in tr]
    out["final_step"] = [cp[-1][0], tp[-1][0]]
    lc, lt = flat(cr, "loss"), flat(tr, "loss")
    out["loss"] = {CONTROL: float(np.mean(lc)), TREATMENT: float(np.mean(lt))}
    out["d"] = abtest.log_ratio_of_means(lt, lc) if len(lt) == len(lc) else None
    out["exactly_equal"] = lc == lt
    per_t: dict[float, list[list[float]]] = defaultdict(lambda: [[], []])
    for arm, rows in ((0, cr), (1, tr)):
        for r in rows:
            for t, loss in zip(r.get("timesteps") or [], r.get("loss") or []):
                per_t[float(t)][arm].append(loss)
    out["per_timestep"] = {t: [float(np.mean(c)), float(np.mean(x))] for t, (c, x) in sorted(per_t.items())
                           if c and x}
    return out


def analyse(arm_dirs: dict, walls: dict, *, self_test: bool, last: int = 1, grad_accum: int = 1) -> dict:
    """``arm_dirs[(seed, arm)]`` -> run folder (``record/``, ``dump/``); ``walls`` the same -> seconds."""
    seeds = sorted({s for s, _ in arm_dirs})
    per_seed = {}
    for s in seeds:
        c = rank_rows(os.path.join(arm_dirs[(s, CONTROL)], "record"))
        t = rank_rows(os.path.join(arm_dirs[(s, TREATMENT)], "record"))
        per_seed[s] = seed_result(c, t, last=last, grad_accum=grad_accum)
        per_seed[s]["reduction"] = mean_reduction(os.path.join(arm_dirs[(s, TREATMENT)], "dump"))
        per_seed[s]["wall_s"] = {CONTROL: walls.get((s, CONTROL)), TREATMENT: walls.get((s, TREATMENT))}
    effects = [r["d"] for r in per_seed.values() if r.get("d") is not None]
    interval = abtest.t_interval(effects)
    mde = abtest.minimal_detectable_effect(interval.sd, interval.n) if interval else None
    durations = {arm: [d for r in per_seed.values() for d in r["step_s"][arm]] for arm in (CONTROL, TREATMENT)}
    overhead = abtest.step_overhead(durations[TREATMENT], durations[CONTROL])
    reductions = [r["reduction"] for r in per_seed.values() if r["reduction"] is not None]
    return {"seeds": seeds, "per_seed": per_seed, "effects": effects,
            "interval": None if interval is None else interval.__dict__,
            "mde": mde, "overhead": overhead, "reduction": float(np.mean(reductions)) if reductions else None,
            "validated": bool(effects),
            "verdict": abtest.verdict(effects, interval, mde, self_test=self_test) if effects else NO_LOSSES,
            "self_test": self_test}
