"""``run_demo``: train the grid, time the library, compute the effect table, write the report."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

import torch

from . import metrics, stats
from .data import FAMILY, load_dataset, moment_matched_gaussian
from .effect import effect_table
from .report import write_report
from .runner import RUNS_FILE, DemoConfig, config_dict, environment, library_timings, load_finished, run_grid, task_key

logger = logging.getLogger(__name__)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step" if "train" in desc else "cell",
                dynamic_ncols=True, smoothing=0.05)


def quality_floor(dataset: str, eval_samples: int) -> float:
    """The quality metric between a training subsample and the held-out set: the best a model can do."""
    data = load_dataset(dataset)
    n = min(eval_samples, data.holdout.shape[0])
    ref = data.holdout[:eval_samples]
    pick = torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(1))[:n]
    return metrics.dataset_quality(data, data.train[pick], ref)


def gaussian_score(dataset: str, eval_samples: int) -> float:
    """The quality metric of the Gaussian with the training split's mean and covariance: what a model must beat."""
    data = load_dataset(dataset)
    ref = data.holdout[:eval_samples]
    return metrics.dataset_quality(data, moment_matched_gaussian(data, eval_samples, seed=2), ref)


def _baselines(cfg: DemoConfig) -> tuple[dict, dict]:
    floors = {d: quality_floor(d, cfg.train_for(d).eval_samples) for d in cfg.datasets}
    gaussian = {d: gaussian_score(d, cfg.train_for(d).eval_samples) for d in cfg.datasets}
    return floors, gaussian


def run_demo(cfg: DemoConfig, *, command: str = "python -m immiscible_lab demo", progress: bool = True) -> dict:
    """Run everything ``cfg`` asks for and write the report folder ``cfg.out``.

    Returns the dict written to ``results.json`` plus ``"files"``, the paths written.
    """
    cfg = cfg.validate()
    start = time.perf_counter()
    tasks = cfg.tasks()
    total_steps = sum(t[3].steps for t in tasks)
    logger.info("demo: %d runs, %d training steps in all", len(tasks), total_steps)
    from concurrent.futures import ThreadPoolExecutor

    finished = load_finished(os.path.join(cfg.out, RUNS_FILE)) if cfg.resume else {}
    resumed = sum(task_key(t) in finished for t in tasks)
    with ThreadPoolExecutor(1) as side:  # the baselines load every data set while the workers train
        baselines = side.submit(_baselines, cfg)
        with _bar(total_steps, f"train {len(tasks)} runs", progress) as bar:
            run_dicts = run_grid(cfg, progress=bar.update, finished=finished)
        floors, gaussian = baselines.result()
    train_seconds = time.perf_counter() - start
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    logger.info("demo: training done in %.1f s", train_seconds)
    with _bar(1, "effect-size table", progress) as bar:
        effect = effect_table(cfg.effect_dims, cfg.effect_ks, metrics=("l2", "cosine"), coarse=cfg.effect_coarse)
        bar.update(1)
    library_ms = library_timings(cfg) if cfg.library_timing else {}
    torch.set_num_threads(threads)

    summary = stats.aggregate(run_dicts)
    order = {st.key: i for i, st in enumerate(cfg.settings())}
    summary = dict(sorted(summary.items(), key=lambda kv: order.get(kv[0], 1e9)))
    for st in summary.values():
        t = cfg.train_for(st["dataset"])
        st["budgets"] = sorted(set(t.budgets) | {t.steps})
        arms = cfg.arms_for(st["dataset"])
        st["arms"] = {a: st["arms"][a] for a in arms if a in st["arms"]}  # the configured order, vanilla first
    cells = stats.cell_verdicts(summary, gaussian)
    robust = stats.robustness(cells, FAMILY)
    for r in robust:
        r.pop("cells_detail")
    result = {
        "command": command,
        "config": config_dict(cfg),
        "environment": environment(cfg),
        "quality_kind": {d: load_dataset(d).quality for d in cfg.datasets},
        "floors": floors,
        "gaussian": gaussian,
        "train_per_dataset": {d: asdict(cfg.train_for(d)) for d in cfg.datasets},
        "library_ms": library_ms,
        "effect": effect,
        "summary": summary,
        "verdicts": cells,
        "robustness": robust,
        "runs": run_dicts,
        "train_wall_seconds": train_seconds,
        "resumed_runs": resumed,
        "run_train_seconds": sum(r["train_seconds"] for r in run_dicts),
    }
    samples = {}
    for r in run_dicts:
        if r["seed"] == cfg.base_seed:
            samples.setdefault(stats.setting_key(r), {})[r["arm"]] = r["samples"]
    references = {d: load_dataset(d).holdout[: 16 if load_dataset(d).dim > 8 else 512] for d in cfg.datasets}
    result["wall_seconds"] = time.perf_counter() - start
    result["files"] = write_report(cfg.out, result, samples, references)
    logger.info("demo: report written at %.1f s", time.perf_counter() - start)
    return result
