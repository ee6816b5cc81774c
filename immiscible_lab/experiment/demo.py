"""``run_demo``: train the grid, time the library, compute the effect table, write the report."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch

from . import metrics, stats
from .data import load_dataset
from .effect import effect_table
from .report import write_report
from .runner import DemoConfig, config_dict, environment, library_timings, run_grid

logger = logging.getLogger(__name__)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step" if "train" in desc else "cell",
                dynamic_ncols=True, smoothing=0.05)


def quality_floor(dataset: str, eval_samples: int) -> float:
    """The quality metric between a training subsample and the held-out set: the best a model can do."""
    data = load_dataset(dataset)
    ref = data.holdout[:eval_samples]
    fresh = data.train[:eval_samples]
    return metrics.sample_quality(fresh, ref, data.quality, data.features)


def run_demo(cfg: DemoConfig, *, command: str = "python -m immiscible demo", progress: bool = True) -> dict:
    """Run everything ``cfg`` asks for and write the report folder ``cfg.out``.

    Returns the dict written to ``results.json`` plus ``"files"``, the paths written.
    """
    cfg = cfg.validate()
    start = time.perf_counter()
    per_dataset = len(cfg.objectives) * len(cfg.arms) * cfg.seeds
    n_runs = len(cfg.datasets) * per_dataset
    total_steps = sum(cfg.train_for(d).steps for d in cfg.datasets) * per_dataset
    logger.info("demo: %d runs, %d training steps in all", n_runs, total_steps)
    with _bar(total_steps, f"train {n_runs} runs", progress) as bar:
        runs = run_grid(cfg, progress=bar.update)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    logger.info("demo: training done in %.1f s", time.perf_counter() - start)
    cells = len(cfg.effect_dims) * (len(cfg.effect_ks) + 1)
    with _bar(cells, "effect-size table", progress) as bar:
        effect = effect_table(cfg.effect_dims, cfg.effect_ks, progress=bar.update)
    library_ms = library_timings(cfg) if cfg.library_timing else {}
    torch.set_num_threads(threads)

    logger.info("demo: effect table and library timing done at %.1f s", time.perf_counter() - start)
    run_dicts = [r.to_dict() for r in runs]
    summary = stats.aggregate(run_dicts)
    summary = {d: {o: {a: summary[d][o][a] for a in cfg.arms} for o in cfg.objectives if o in summary[d]}
               for d in cfg.datasets if d in summary}  # the configured order, vanilla first in plots
    result = {
        "command": command,
        "config": config_dict(cfg),
        "environment": environment(cfg),
        "quality_kind": {d: load_dataset(d).quality for d in cfg.datasets},
        "floors": {d: quality_floor(d, cfg.train_for(d).eval_samples) for d in cfg.datasets},
        "train_per_dataset": {d: asdict(cfg.train_for(d)) for d in cfg.datasets},
        "library_ms": library_ms,
        "effect": effect,
        "summary": summary,
        "verdicts": stats.verdicts(summary),
        "runs": run_dicts,
    }
    first = cfg.base_seed
    samples = {}
    for r in runs:
        if r.seed == first:
            samples.setdefault(r.dataset, {}).setdefault(r.objective, {})[r.arm] = r.samples
    samples = {ds: {obj: {a: by_arm[a] for a in cfg.arms if a in by_arm} for obj, by_arm in objs.items()}
               for ds, objs in samples.items()}  # arms in the configured order
    references = {d: load_dataset(d).holdout[: cfg.train_for(d).eval_samples] for d in cfg.datasets}
    result["wall_seconds"] = time.perf_counter() - start
    result["files"] = write_report(cfg.out, result, samples, references)
    logger.info("demo: report written at %.1f s", time.perf_counter() - start)
    return result
