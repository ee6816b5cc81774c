"""One training run: a dataset, an objective (and DDPM schedule), a model family, a pairing arm and
a seed, at a fixed compute budget.

Every arm of a given seed sees the same initial weights, the same data batches and the same
diffusion times (separate generators derived from the seed), and is evaluated from the same fixed
starting noise: differences between arms come from the pairing alone. Checkpoints of one run
stand in for shorter budgets (constant learning rate, so a run stopped at step 1000 is the same
run as this one at step 1000).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from immiscible import derive_seed
from . import diffusion, metrics
from .data import Dataset
from .models import FAMILY_OPTIM, build_model, ema_decay_at, ema_update_
from .pairing import Arm, pair_noise

EVAL_SEED = 20240612  # the starting noise of every evaluation, shared by all arms and seeds
SHOWN_SAMPLES = 16    # samples kept per run for the figures


@dataclass(frozen=True)
class TrainConfig:
    """Budget and hyper-parameters shared by every arm (equal compute)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float | None = None            # None: the model family's (models.FAMILY_OPTIM)
    hidden: int = 128
    depth: int = 3
    ema_decay: float | None = None     # None: the model family's (models.FAMILY_OPTIM)
    evals: int = 6                     # evaluation checkpoints, evenly spaced, the last at ``steps``
    eval_samples: int = 512
    sampler_steps: tuple[int, ...] = (1, 2, 8, 32)
    log_every: int = 50
    budgets: tuple[int, ...] = ()      # further checkpoints the verdicts are read at (<= steps)
    clip: tuple[str, ...] = ("off",)   # DDIM x0 clipping variants evaluated for ddpm on images: "off", "on"


@dataclass
class RunResult:
    dataset: str
    objective: str
    arm: str
    seed: int
    schedule: str = "-"               # DDPM noise schedule ("-" for flow)
    model: str = "mlp"
    eval_at: list[int] = field(default_factory=list)
    quality: dict = field(default_factory=dict)        # sampler -> sampler steps -> per checkpoint
    straightness: dict = field(default_factory=dict)   # sampler -> per checkpoint (1-step vs max-step gap)
    val_loss: list[float] = field(default_factory=list)  # held-out loss, vanilla pairing
    loss_at: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    noise_sq_norm: float = 0.0        # mean |n|^2 / D of the noise trained on
    pair_sq_dist: float = 0.0         # mean |x0 - n|^2 / D
    pair_cosine: float = 0.0          # mean cos(x0, n)
    pair_cosine_pooled: float = float("nan")  # mean cos(pool4(x0), pool4(n)), images only
    pairing_ms: float = 0.0           # mean wall-clock of pair_noise per step
    train_seconds: float = 0.0
    samples: list = field(default_factory=list)  # SHOWN_SAMPLES x D: last evaluation, first sampler, most steps

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoints(steps: int, evals: int, budgets=()) -> list[int]:
    """``evals`` evaluation steps evenly spaced in (0, steps], the last one at ``steps``, plus ``budgets``."""
    even = {max(1, round(steps * (i + 1) / evals)) for i in range(evals)}
    return sorted(even | {b for b in budgets if 1 <= b <= steps})


def optimizer_settings(cfg: TrainConfig, model: str) -> tuple[float, float]:
    """``(Adam learning rate, EMA decay)`` of a run: ``cfg``'s where set, else the model family's."""
    family = FAMILY_OPTIM[model]
    return (cfg.lr if cfg.lr is not None else family["lr"],
            cfg.ema_decay if cfg.ema_decay is not None else family["ema_decay"])


def _evaluate(model, data: Dataset, objective: str, cfg: TrainConfig, alpha_bar, eval_noise, val) -> dict:
    out = {"quality": {}, "straightness": {}}
    reference = data.holdout[: cfg.eval_samples]
    # x0 clipping to [-1, 1] is for data in [-1, 1] (the images); the 2-D ring reaches |x| = 2.9
    samplers = diffusion.samplers_for(objective, cfg.clip if data.is_image else ("off",))
    lo, hi = min(cfg.sampler_steps), max(cfg.sampler_steps)
    for sampler in samplers:
        finals = {}
        for s in cfg.sampler_steps:
            finals[s] = diffusion.sample(model, objective, eval_noise, s, alpha_bar, sampler)
            out["quality"].setdefault(sampler, {})[str(s)] = metrics.dataset_quality(data, finals[s], reference)
        out["straightness"][sampler] = metrics.straightness_gap(
            *(torch.nan_to_num(finals[s], nan=1e6, posinf=1e6, neginf=-1e6) for s in (lo, hi)))
        if sampler == samplers[0]:
            out["samples"] = finals[hi][: SHOWN_SAMPLES if data.dim > 8 else 512]
    out["val_loss"] = float(diffusion.objective_loss(model, objective, val[0], val[1], val[2], alpha_bar))
    return out


def train_run(data: Dataset, objective: str, arm: Arm, seed: int, cfg: TrainConfig, progress=None, *,
              schedule: str = "scaled-linear", model: str = "mlp") -> RunResult:
    """Train one model and evaluate it at ``checkpoints(cfg.steps, cfg.evals, cfg.budgets)``.

    Parameters
    ----------
    progress : callable, optional
        Called with the number of steps just done (for a progress bar).
    schedule : str
        The DDPM noise schedule (``diffusion.SCHEDULES``); ignored for flow.
    model : str
        The denoiser family (``models.MODELS``).
    """
    if objective not in diffusion.OBJECTIVES:
        raise ValueError(f"objective must be one of {diffusion.OBJECTIVES}, got {objective!r}")
    if not arm.applies_to(data.shape):
        raise ValueError(f"arm {arm.name} does not apply to {data.name} (samples of shape {data.shape})")
    gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in range(4)]
    init_gen, data_gen, time_gen, noise_gen = gens
    net = build_model(model, data.dim, hidden=cfg.hidden, depth=cfg.depth, generator=init_gen)
    ema = copy.deepcopy(net).requires_grad_(False)
    lr, ema_decay = optimizer_settings(cfg, model)
    opt = torch.optim.Adam(net.parameters(), lr=lr, foreach=True)
    alpha_bar = diffusion.alpha_bar_for(schedule if objective == "ddpm" else "scaled-linear")

    eval_gen = torch.Generator().manual_seed(EVAL_SEED)
    eval_noise = torch.randn(cfg.eval_samples, data.dim, generator=eval_gen)
    val_x0 = data.holdout[: cfg.eval_samples]
    val = (val_x0, torch.randn(val_x0.shape, generator=eval_gen),
           diffusion.draw_times(objective, val_x0.shape[0], generator=eval_gen))

    result = RunResult(data.name, objective, arm.name, seed, schedule if objective == "ddpm" else "-", model)
    evals = set(checkpoints(cfg.steps, cfg.evals, cfg.budgets))
    shape = data.shape if data.is_image else None
    window, sq_norm, sq_dist, cosine, pooled, pair_s = [], 0.0, 0.0, 0.0, 0.0, 0.0
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x0 = data.train[torch.randint(0, data.train.shape[0], (cfg.batch_size,), generator=data_gen)]
        t0 = time.perf_counter()
        noise = pair_noise(x0, arm, generator=noise_gen, shape=shape)
        pair_s += time.perf_counter() - t0
        t = diffusion.draw_times(objective, cfg.batch_size, generator=time_gen)
        loss = diffusion.objective_loss(net, objective, x0, noise, t, alpha_bar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update_(ema, net, ema_decay_at(step, ema_decay))

        window.append(float(loss.detach()))
        sq_norm += float(noise.square().mean())
        sq_dist += float((x0 - noise).square().mean())
        cosine += float(torch.nn.functional.cosine_similarity(x0, noise, dim=1).mean())
        if shape is not None and min(shape[-2:]) >= 4:
            pooled += metrics.pooled_cosine(x0.view(-1, *shape), noise.view(-1, *shape), 4)
        if step % cfg.log_every == 0 or step == cfg.steps:
            result.loss_at.append(step)
            result.train_loss.append(sum(window) / len(window))
            window = []
        if step in evals:
            ev = _evaluate(ema, data, objective, cfg, alpha_bar, eval_noise, val)
            result.eval_at.append(step)
            for sampler, by_steps in ev["quality"].items():
                for s, q in by_steps.items():
                    result.quality.setdefault(sampler, {}).setdefault(s, []).append(q)
            for sampler, gap in ev["straightness"].items():
                result.straightness.setdefault(sampler, []).append(gap)
            result.val_loss.append(ev["val_loss"])
            result.samples = ev["samples"].tolist()
        if progress is not None:
            progress(1)
    result.train_seconds = time.perf_counter() - start
    result.noise_sq_norm = sq_norm / cfg.steps
    result.pair_sq_dist = sq_dist / cfg.steps
    result.pair_cosine = cosine / cfg.steps
    if shape is not None and min(shape[-2:]) >= 4:
        result.pair_cosine_pooled = pooled / cfg.steps
    result.pairing_ms = pair_s / cfg.steps * 1e3
    return result
