"""The demo's grid: datasets x objectives x arms x seeds, run in worker processes at equal compute."""
from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import torch

from . import diffusion
from .data import DATASETS, load_dataset
from .pairing import DEFAULT_ARMS, library_select_ms, parse_arm
from .train import TrainConfig, train_run

#: The digits MLP is wider: a 3x128 eps-prediction model samples poorly there (FD ~20 vs ~3 at 3x256).
DATASET_TRAIN = {"gmm": {"steps": 800, "hidden": 128}, "digits": {"steps": 1000, "hidden": 256}}


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo runs; every field is a CLI option of ``python -m immiscible demo``."""

    datasets: tuple[str, ...] = DATASETS
    objectives: tuple[str, ...] = diffusion.OBJECTIVES
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: int = 3
    base_seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    #: per-dataset changes to ``train`` (a CLI training option overrides them for every data set)
    dataset_train: dict = field(default_factory=lambda: dict(DATASET_TRAIN))
    workers: int = 0                    # 0: one per CPU core, at most 2
    threads: int = 1                    # torch threads per worker
    out: str = "immiscible-report"
    effect_dims: tuple[int, ...] = (2, 64, 3072, 16384, 65536, 262144)
    effect_ks: tuple[int, ...] = (4, 64)
    library_timing: bool = True

    def train_for(self, dataset: str) -> TrainConfig:
        """The training configuration of ``dataset``: ``train`` with its ``dataset_train`` changes."""
        return replace(self.train, **self.dataset_train.get(dataset, {}))

    def validate(self) -> DemoConfig:
        for d in self.datasets:
            if d not in DATASETS:
                raise ValueError(f"dataset must be one of {DATASETS}, got {d!r}")
        for o in self.objectives:
            if o not in diffusion.OBJECTIVES:
                raise ValueError(f"objective must be one of {diffusion.OBJECTIVES}, got {o!r}")
        arms = [parse_arm(a).name for a in self.arms]
        if "vanilla" not in arms:
            raise ValueError("arms must include 'vanilla' (the baseline every verdict compares against)")
        if self.seeds < 2:
            raise ValueError(f"seeds must be >= 2 (a spread is needed for a verdict), got {self.seeds}")
        for t in [self.train_for(d) for d in self.datasets]:
            self._check_train(t)
        return replace(self, arms=tuple(dict.fromkeys(arms)),
                       train=replace(self.train, sampler_steps=tuple(sorted(set(self.train.sampler_steps)))))

    @staticmethod
    def _check_train(t: TrainConfig) -> None:
        if t.steps < 1 or t.batch_size < 1 or t.evals < 1 or t.eval_samples < 8:
            raise ValueError("steps, batch_size and evals must be >= 1 and eval_samples >= 8")
        if not t.sampler_steps or min(t.sampler_steps) < 1:
            raise ValueError(f"sampler_steps must be positive integers, got {t.sampler_steps}")


def preset(name: str) -> DemoConfig:
    """``"default"`` (< 10 min on 2 cores), ``"quick"`` (CI smoke test) or ``"tiny"`` (unit test)."""
    if name == "default":
        return DemoConfig()
    if name == "quick":
        return DemoConfig(seeds=2, train=TrainConfig(evals=2, eval_samples=128, sampler_steps=(1, 2, 8, 16)),
                          dataset_train={"gmm": {"steps": 100, "hidden": 64}, "digits": {"steps": 100, "hidden": 64}},
                          effect_dims=(2, 64, 3072), library_timing=False)
    if name == "tiny":
        return DemoConfig(datasets=("gmm",), arms=("vanilla", "knn-l2-4", "assign"), seeds=2, workers=1,
                          train=TrainConfig(steps=30, hidden=32, evals=2, eval_samples=64, sampler_steps=(1, 2, 8),
                                            log_every=10), dataset_train={},
                          effect_dims=(2, 64), effect_ks=(4,), library_timing=False)
    raise ValueError(f"preset must be 'default', 'quick' or 'tiny', got {name!r}")


# --------------------------------------------------------------------------- workers

_DATA_CACHE: dict = {}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # Adam/EMA state goes subnormal on these tiny models: 2-3x slower steps


def _run_one(task):
    dataset, objective, arm, seed, cfg = task
    data = _DATA_CACHE.get(dataset)
    if data is None:
        data = _DATA_CACHE[dataset] = load_dataset(dataset)
    return train_run(data, objective, parse_arm(arm), seed, cfg)


def _tasks(cfg: DemoConfig) -> list:
    tasks = [(d, o, a, cfg.base_seed + s, cfg.train_for(d)) for d in cfg.datasets for o in cfg.objectives
             for a in cfg.arms for s in range(cfg.seeds)]
    # Longest first (large k on the larger data set) so the workers finish together.
    cost = {a: parse_arm(a).k for a in cfg.arms}
    return sorted(tasks, key=lambda t: -(t[4].steps * t[4].hidden**2 * (1 + cost[t[2]] * dataset_dim(t[0]) / 4096)))


def dataset_dim(name: str) -> int:
    return {"gmm": 2, "digits": 64}.get(name, 1)


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else max(1, min(2, os.cpu_count() or 1))


def run_grid(cfg: DemoConfig, *, progress=None) -> list:
    """Train every run of the grid; ``progress(n_steps)`` is called as runs advance."""
    tasks = _tasks(cfg)
    workers = resolve_workers(cfg.workers)
    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_flush_denormal(True)
        try:
            torch.set_num_threads(cfg.threads)
            return [_run_one_with_progress(task, progress) for task in tasks]
        finally:
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)
    import multiprocessing as mp

    results = []
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg.threads,)) as pool:
        for fut in as_completed([pool.submit(_run_one, t) for t in tasks]):
            results.append(fut.result())
            if progress:
                progress(results[-1].eval_at[-1])
    return results


def _run_one_with_progress(task, progress):
    dataset, objective, arm, seed, cfg = task
    data = _DATA_CACHE.get(dataset)
    if data is None:
        data = _DATA_CACHE[dataset] = load_dataset(dataset)
    return train_run(data, objective, parse_arm(arm), seed, cfg, progress=progress)


def library_timings(cfg: DemoConfig) -> dict:
    """ms per ``immiscible.select_noise`` call at each (dataset, arm) training shape."""
    out = {}
    for d in cfg.datasets:
        for a in cfg.arms:
            arm = parse_arm(a)
            out[f"{d}/{arm.name}"] = library_select_ms(arm, cfg.train_for(d).batch_size, dataset_dim(d))
    return out


def environment(cfg: DemoConfig) -> dict:
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "workers": resolve_workers(cfg.workers),
        "threads_per_worker": cfg.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def config_dict(cfg: DemoConfig) -> dict:
    return asdict(cfg)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start
