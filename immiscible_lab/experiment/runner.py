"""The demo's grid: settings (dataset x objective x DDPM schedule x model) x arms x seeds, run in
worker processes at equal compute; every finished run is appended to ``runs.jsonl`` in the report
folder, so ``--resume`` continues an interrupted grid."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import torch

from . import diffusion
from .data import DATASETS, dataset_shape, load_dataset
from .models import MODELS
from .pairing import DEFAULT_ARMS, library_select_ms, parse_arm
from .train import TrainConfig, train_run

logger = logging.getLogger(__name__)

#: The digits MLP is wider: a 3x128 eps-prediction model samples poorly there.
DATASET_TRAIN = {"gmm": {"steps": 800, "hidden": 128}, "digits": {"steps": 1000, "hidden": 256},
                 "patches16": {"steps": 1000, "hidden": 256}, "patches32": {"steps": 1000, "hidden": 256}}
#: keys of ``DemoConfig.dataset_grid`` entries
GRID_KEYS = ("objectives", "schedules", "models", "arms", "seeds")
RUNS_FILE = "runs.jsonl"


@dataclass(frozen=True)
class Setting:
    """What one trained model is, apart from its arm and seed."""

    dataset: str
    objective: str
    schedule: str = "-"       # DDPM noise schedule; "-" for flow
    model: str = "mlp"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.objective}" + (f"/{self.schedule}" if self.objective == "ddpm" else "") \
            + f"/{self.model}"


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo runs; every field is a CLI option of ``python -m immiscible_lab demo``."""

    datasets: tuple[str, ...] = ("gmm", "digits")
    objectives: tuple[str, ...] = diffusion.OBJECTIVES
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: int = 3
    base_seed: int = 0
    schedules: tuple[str, ...] = ("scaled-linear",)   # DDPM noise schedules
    models: tuple[str, ...] = ("mlp",)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: per-dataset changes to ``train`` (a CLI training option overrides them for every data set)
    dataset_train: dict = field(default_factory=lambda: dict(DATASET_TRAIN))
    #: per-dataset changes to the grid: {dataset: {"arms"|"models"|"objectives"|"schedules"|"seeds": ...}}
    dataset_grid: dict = field(default_factory=dict)
    workers: int = 0                    # 0: one per CPU core, at most 2
    threads: int = 1                    # torch threads per worker
    out: str = "immiscible-report"
    resume: bool = False
    effect_dims: tuple[int, ...] = (2, 64, 768, 3072, 16384, 65536, 262144)
    effect_ks: tuple[int, ...] = (4, 64)
    effect_coarse: tuple[int, ...] = (4, 8)
    library_timing: bool = True

    def train_for(self, dataset: str) -> TrainConfig:
        """The training configuration of ``dataset``: ``train`` with its ``dataset_train`` changes."""
        return replace(self.train, **self.dataset_train.get(dataset, {}))

    def grid_for(self, dataset: str, key: str):
        """``key`` (one of ``GRID_KEYS``) for ``dataset``: its ``dataset_grid`` entry or the global value."""
        return self.dataset_grid.get(dataset, {}).get(key, getattr(self, key))

    def arms_for(self, dataset: str) -> tuple[str, ...]:
        """The arms of ``dataset`` that apply to its samples (coarse arms need images at least N x N)."""
        shape = dataset_shape(dataset)
        return tuple(a for a in self.grid_for(dataset, "arms") if parse_arm(a).applies_to(shape))

    def settings(self) -> list[Setting]:
        out = []
        for d in self.datasets:
            for o in self.grid_for(d, "objectives"):
                for s in (self.grid_for(d, "schedules") if o == "ddpm" else ("-",)):
                    for m in self.grid_for(d, "models"):
                        out.append(Setting(d, o, s, m))
        return out

    def tasks(self) -> list[tuple]:
        """``(setting, arm, seed, train config)`` of every run of the grid."""
        return [(st, a, self.base_seed + i, self.train_for(st.dataset)) for st in self.settings()
                for a in self.arms_for(st.dataset) for i in range(self.grid_for(st.dataset, "seeds"))]

    def validate(self) -> DemoConfig:
        for d in self.datasets:
            if d not in DATASETS:
                raise ValueError(f"dataset must be one of {DATASETS}, got {d!r}")
        for d in self.datasets:
            for o in self.grid_for(d, "objectives"):
                if o not in diffusion.OBJECTIVES:
                    raise ValueError(f"objective must be one of {diffusion.OBJECTIVES}, got {o!r}")
            for s in self.grid_for(d, "schedules"):
                if s not in diffusion.SCHEDULES:
                    raise ValueError(f"schedule must be one of {diffusion.SCHEDULES}, got {s!r}")
            for m in self.grid_for(d, "models"):
                if m not in MODELS:
                    raise ValueError(f"model must be one of {MODELS}, got {m!r}")
            arms = [parse_arm(a).name for a in self.grid_for(d, "arms")]
            if "vanilla" not in arms:
                raise ValueError("arms must include 'vanilla' (the baseline every verdict compares against)")
            if self.grid_for(d, "seeds") < 2:
                raise ValueError(f"seeds must be >= 2 (a spread is needed for a verdict), got {self.grid_for(d, 'seeds')}")
        for c in self.train.clip:
            if c not in ("off", "on"):
                raise ValueError(f"clip must be 'off' and/or 'on', got {c!r}")
        for t in [self.train_for(d) for d in self.datasets]:
            self._check_train(t)
        norm = {d: {**g, "arms": tuple(dict.fromkeys(parse_arm(a).name for a in g["arms"]))} if "arms" in g else g
                for d, g in self.dataset_grid.items()}
        return replace(self, arms=tuple(dict.fromkeys(parse_arm(a).name for a in self.arms)), dataset_grid=norm,
                       train=replace(self.train, sampler_steps=tuple(sorted(set(self.train.sampler_steps))),
                                     budgets=tuple(sorted(set(self.train.budgets)))))

    @staticmethod
    def _check_train(t: TrainConfig) -> None:
        if t.steps < 1 or t.batch_size < 1 or t.evals < 1 or t.eval_samples < 8:
            raise ValueError("steps, batch_size and evals must be >= 1 and eval_samples >= 8")
        if not t.sampler_steps or min(t.sampler_steps) < 1:
            raise ValueError(f"sampler_steps must be positive integers, got {t.sampler_steps}")
        if t.lr is not None and not t.lr > 0:
            raise ValueError(f"--lr must be > 0, got {t.lr}")
        if t.ema_decay is not None and not 0 <= t.ema_decay < 1:
            raise ValueError(f"--ema-decay must lie in [0, 1) (the EMA is bias-corrected by 1 - decay^step), "
                             f"got {t.ema_decay}")
        if any(b < 1 or b > t.steps for b in t.budgets):
            raise ValueError(f"budgets must lie in [1, steps={t.steps}], got {t.budgets}")


def preset(name: str) -> DemoConfig:
    """``"default"`` (< 10 min on 2 cores), ``"quick"`` (CI smoke test, <= 60 s), ``"tiny"`` (unit test)
    or ``"full"`` (every axis, about 2 h on 2 cores with 2 workers)."""
    if name == "default":
        return DemoConfig(
            datasets=("gmm", "digits"),
            arms=("vanilla", "knn-l2-4", "knn-cosine-4", "knn-coarse4-4", "assign-l2-1"),
            train=TrainConfig(evals=4, sampler_steps=(1, 8, 32), clip=("off", "on")),
            dataset_train={"gmm": {"steps": 1000, "hidden": 128, "budgets": (250,)},
                           "digits": {"steps": 3000, "hidden": 128, "budgets": (1000,)}},
            # On digits the residual MLP beats the moment-matched Gaussian where the plain 3x256 MLP's
            # DDPM does not (the full preset runs both), at the plain MLP's cost when 128 wide.
            dataset_grid={"digits": {"models": ("resmlp",)}})
    if name == "quick":
        return DemoConfig(datasets=("gmm", "digits"), arms=("vanilla", "knn-l2-4", "knn-coarse4-4", "assign-l2-1"),
                          seeds=2, train=TrainConfig(evals=2, eval_samples=128, sampler_steps=(1, 8),
                                                     clip=("off", "on")),
                          dataset_train={"gmm": {"steps": 100, "hidden": 64, "budgets": (50,)},
                                         "digits": {"steps": 100, "hidden": 64, "budgets": (50,)}},
                          dataset_grid={"gmm": {"arms": ("vanilla", "knn-l2-4")}},
                          effect_dims=(2, 64, 768), effect_ks=(4,), effect_coarse=(4,), library_timing=False)
    if name == "tiny":
        return DemoConfig(datasets=("gmm",), arms=("vanilla", "knn-l2-4", "assign"), seeds=2, workers=1,
                          train=TrainConfig(steps=30, hidden=32, evals=2, eval_samples=64, sampler_steps=(1, 2, 8),
                                            log_every=10), dataset_train={},
                          effect_dims=(2, 64), effect_ks=(4,), effect_coarse=(4,), library_timing=False)
    if name == "full":
        return full_preset()
    raise ValueError(f"preset must be 'default', 'quick', 'tiny' or 'full', got {name!r}")


def full_preset() -> DemoConfig:
    """Every axis of the issue in one grid, sized to about 2 h on 2 cores with ``--workers 2``.

    * digits (D = 64): flow and DDPM under both schedules, both model families, 4000 steps read at
      1000 and 4000, DDIM with x0 clipping off and on; arms vanilla, knn-l2-4, knn-cosine-4,
      knn-coarse4-4, assign-l2-1.
    * patches16 (D = 768) and patches32 (D = 3072): flow and scaled-linear DDPM, the residual MLP,
      4500 steps read at 1000, 3000 and 4500 (at 3000 steps alone the 32-step flow verdicts on patches
      differed from those at 4500: the budget is an axis there); arms vanilla, knn-l2-4, knn-cosine-4,
      knn-coarse8-4, assign-l2-1 (patches16 also knn-coarse4-4).
    * gmm (D = 2): flow and scaled-linear DDPM, MLP, vanilla, knn-l2-4, knn-cosine-4, assign-l2-1.
    """
    digits_arms = ("vanilla", "knn-l2-4", "knn-cosine-4", "knn-coarse4-4", "assign-l2-1")
    patch_arms = ("vanilla", "knn-l2-4", "knn-cosine-4", "knn-coarse8-4", "assign-l2-1")
    return DemoConfig(
        datasets=("gmm", "digits", "patches16", "patches32"),
        arms=digits_arms, schedules=("scaled-linear", "cosine"), models=("mlp", "resmlp"), seeds=3,
        train=TrainConfig(evals=4, sampler_steps=(1, 8, 32), clip=("off", "on")),
        dataset_train={"gmm": {"steps": 1000, "hidden": 128, "budgets": (250,)},
                       "digits": {"steps": 4000, "hidden": 256, "budgets": (1000,)},
                       "patches16": {"steps": 4500, "hidden": 256, "budgets": (1000, 3000)},
                       "patches32": {"steps": 4500, "hidden": 256, "budgets": (1000, 3000)}},
        dataset_grid={"gmm": {"arms": ("vanilla", "knn-l2-4", "knn-cosine-4", "assign-l2-1"),
                              "schedules": ("scaled-linear",), "models": ("mlp",)},
                      "patches16": {"arms": patch_arms + ("knn-coarse4-4",), "schedules": ("scaled-linear",),
                                    "models": ("resmlp",)},
                      "patches32": {"arms": patch_arms, "schedules": ("scaled-linear",), "models": ("resmlp",)}},
        effect_dims=(2, 64, 768, 3072, 16384, 65536, 262144), workers=2)


# --------------------------------------------------------------------------- workers


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # Adam/EMA state goes subnormal on these tiny models: 2-3x slower steps


def _run_one(task, progress=None) -> dict:
    setting, arm, seed, cfg = task
    run = train_run(load_dataset(setting.dataset), setting.objective, parse_arm(arm), seed, cfg, progress,
                    schedule=setting.schedule if setting.objective == "ddpm" else "scaled-linear",
                    model=setting.model)
    return run.to_dict()


def task_key(task) -> str:
    """A stable id of one run: its setting, arm, seed and training configuration."""
    setting, arm, seed, cfg = task
    body = json.dumps([asdict(setting), arm, seed, asdict(cfg)], sort_keys=True, default=list)
    return f"{setting.key}/{arm}/seed{seed}/" + hashlib.sha1(body.encode()).hexdigest()[:10]


def _task_cost(task) -> float:
    setting, arm, _, cfg = task
    dim = 1
    for s in dataset_shape(setting.dataset):
        dim *= s
    width = cfg.hidden * (2 if setting.model == "resmlp" else 1)
    return cfg.steps * (width * (dim + width) + parse_arm(arm).k * dim * 40)


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else max(1, min(2, os.cpu_count() or 1))


def load_finished(path: str) -> dict:
    """``{task key: run dict}`` of the runs recorded in a ``runs.jsonl`` (a torn last line is ignored)."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[rec["key"]] = rec["run"]
    return done


def run_grid(cfg: DemoConfig, *, progress=None, finished: dict | None = None) -> list[dict]:
    """Train every run of the grid not yet in ``cfg.out/runs.jsonl`` (with ``cfg.resume``); returns run dicts.

    ``progress(n_steps)`` is called as runs advance. Each finished run is appended to the file at
    once, so an interrupted grid loses at most the runs in flight. ``finished``: that file's runs
    when the caller has read them already (:func:`load_finished`).
    """
    tasks = cfg.tasks()
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, RUNS_FILE)
    done = (finished if finished is not None else load_finished(path)) if cfg.resume else {}
    if not cfg.resume and os.path.exists(path):
        os.remove(path)
    keys = [task_key(t) for t in tasks]
    todo = [t for t, k in zip(tasks, keys) if k not in done]
    if done:
        logger.info("resume: %d of %d runs already in %s", len(tasks) - len(todo), len(tasks), path)
        if progress:
            progress(sum(t[3].steps for t, k in zip(tasks, keys) if k in done))
    todo.sort(key=lambda t: -_task_cost(t))  # longest first so the workers finish together
    results = {k: done[k] for k in keys if k in done}

    def record(task, run):
        key = task_key(task)
        results[key] = run
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "run": run}) + "\n")

    workers = resolve_workers(cfg.workers)
    if workers == 1 or len(todo) <= 1:
        threads = torch.get_num_threads()
        torch.set_flush_denormal(True)
        try:
            torch.set_num_threads(cfg.threads)
            for task in todo:
                record(task, _run_one(task, progress))
        finally:
            torch.set_num_threads(threads)
            torch.set_flush_denormal(False)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(cfg.threads,)) as pool:
            futures = {pool.submit(_run_one, t): t for t in todo}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
                if progress:
                    progress(futures[fut][3].steps)
    return [results[k] for k in keys]


def library_timings(cfg: DemoConfig) -> dict:
    """ms per ``immiscible.select_noise`` call at each (dataset, arm) training shape."""
    out = {}
    for d in cfg.datasets:
        for a in cfg.arms_for(d):
            out[f"{d}/{a}"] = library_select_ms(parse_arm(a), cfg.train_for(d).batch_size, dataset_shape(d))
    return out


def environment(cfg: DemoConfig) -> dict:
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "workers": resolve_workers(cfg.workers),
        "threads_per_worker": cfg.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": load,
    }


def config_dict(cfg: DemoConfig) -> dict:
    return asdict(cfg)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start
