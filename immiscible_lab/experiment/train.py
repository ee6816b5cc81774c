"""One training run: a dataset, an objective, a pairing arm and a seed, at a fixed compute budget.

Every arm of a given seed sees the same initial weights, the same data batches and the same
diffusion times (separate generators derived from the seed), and is evaluated from the same fixed
starting noise: differences between arms come from the pairing alone.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch

from immiscible import derive_seed
from . import diffusion, metrics
from .data import Dataset
from .models import MLPDenoiser, ema_update_
from .pairing import Arm, pair_noise

EVAL_SEED = 20240612  # the starting noise of every evaluation, shared by all arms and seeds


@dataclass(frozen=True)
class TrainConfig:
    """Budget and hyper-parameters shared by every arm (equal compute)."""

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 128
    depth: int = 3
    ema_decay: float = 0.995
    evals: int = 6                     # evaluation checkpoints, evenly spaced, the last at ``steps``
    eval_samples: int = 512
    sampler_steps: tuple[int, ...] = (1, 2, 8, 32)
    log_every: int = 50


@dataclass
class RunResult:
    dataset: str
    objective: str
    arm: str
    seed: int
    eval_at: list[int] = field(default_factory=list)
    quality: dict[str, list[float]] = field(default_factory=dict)   # sampler steps -> per checkpoint
    straightness: list[float] = field(default_factory=list)         # 1-step vs max-step gap
    val_loss: list[float] = field(default_factory=list)             # held-out loss, vanilla pairing
    mmd: list[float] = field(default_factory=list)                  # max-step sampler, low-dim data only
    loss_at: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    noise_sq_norm: float = 0.0        # mean |n|^2 / D of the noise trained on
    pair_sq_dist: float = 0.0         # mean |x0 - n|^2 / D
    pair_cosine: float = 0.0          # mean cos(x0, n)
    pairing_ms: float = 0.0           # mean wall-clock of pair_noise per step
    train_seconds: float = 0.0
    samples: object = None            # (N, D) tensor: last evaluation, most sampler steps (not in JSON)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


def checkpoints(steps: int, evals: int) -> list[int]:
    """``evals`` evaluation steps evenly spaced in (0, steps], the last one at ``steps``."""
    return sorted({max(1, round(steps * (i + 1) / evals)) for i in range(evals)})


def _evaluate(model, data: Dataset, objective: str, cfg: TrainConfig, alpha_bar, eval_noise, val) -> dict:
    out = {"quality": {}}
    reference = data.holdout[: cfg.eval_samples]
    finals = {}
    for s in cfg.sampler_steps:
        x = diffusion.sample(model, objective, eval_noise, s, alpha_bar)
        finals[s] = x
        out["quality"][str(s)] = metrics.sample_quality(x, reference, data.quality, data.features)
    lo, hi = min(cfg.sampler_steps), max(cfg.sampler_steps)
    out["straightness"] = metrics.straightness_gap(finals[lo], finals[hi])
    out["mmd"] = metrics.mmd_rbf(finals[hi], reference) if data.dim <= 8 else float("nan")
    with torch.no_grad():
        out["samples"] = finals[hi]
    out["val_loss"] = float(diffusion.objective_loss(model, objective, val[0], val[1], val[2], alpha_bar))
    return out


def train_run(data: Dataset, objective: str, arm: Arm, seed: int, cfg: TrainConfig,
              progress=None) -> RunResult:
    """Train one model and evaluate it at ``checkpoints(cfg.steps, cfg.evals)``.

    Parameters
    ----------
    progress : callable, optional
        Called with the number of steps just done (for a progress bar).
    """
    if objective not in diffusion.OBJECTIVES:
        raise ValueError(f"objective must be one of {diffusion.OBJECTIVES}, got {objective!r}")
    gens = [torch.Generator().manual_seed(derive_seed(seed, i)) for i in range(4)]
    init_gen, data_gen, time_gen, noise_gen = gens
    model = MLPDenoiser(data.dim, hidden=cfg.hidden, depth=cfg.depth, generator=init_gen)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    alpha_bar = diffusion.ddpm_alpha_bar()

    eval_gen = torch.Generator().manual_seed(EVAL_SEED)
    eval_noise = torch.randn(cfg.eval_samples, data.dim, generator=eval_gen)
    val_x0 = data.holdout[: cfg.eval_samples]
    val = (val_x0, torch.randn(val_x0.shape, generator=eval_gen),
           diffusion.draw_times(objective, val_x0.shape[0], generator=eval_gen))

    result = RunResult(data.name, objective, arm.name, seed)
    evals = set(checkpoints(cfg.steps, cfg.evals))
    window, sq_norm, sq_dist, cosine, pair_s = [], 0.0, 0.0, 0.0, 0.0
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x0 = data.train[torch.randint(0, data.train.shape[0], (cfg.batch_size,), generator=data_gen)]
        t0 = time.perf_counter()
        noise = pair_noise(x0, arm, generator=noise_gen)
        pair_s += time.perf_counter() - t0
        t = diffusion.draw_times(objective, cfg.batch_size, generator=time_gen)
        loss = diffusion.objective_loss(model, objective, x0, noise, t, alpha_bar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update_(ema, model, cfg.ema_decay if step > 1 else 0.0)

        window.append(float(loss.detach()))
        sq_norm += float(noise.square().mean())
        sq_dist += float((x0 - noise).square().mean())
        cosine += float(torch.nn.functional.cosine_similarity(x0, noise, dim=1).mean())
        if step % cfg.log_every == 0 or step == cfg.steps:
            result.loss_at.append(step)
            result.train_loss.append(sum(window) / len(window))
            window = []
        if step in evals:
            ev = _evaluate(ema, data, objective, cfg, alpha_bar, eval_noise, val)
            result.eval_at.append(step)
            for s, q in ev["quality"].items():
                result.quality.setdefault(s, []).append(q)
            result.straightness.append(ev["straightness"])
            result.mmd.append(ev["mmd"])
            result.val_loss.append(ev["val_loss"])
            result.samples = ev["samples"]
        if progress is not None:
            progress(1)
    result.train_seconds = time.perf_counter() - start
    result.noise_sq_norm = sq_norm / cfg.steps
    result.pair_sq_dist = sq_dist / cfg.steps
    result.pair_cosine = cosine / cfg.steps
    result.pairing_ms = pair_s / cfg.steps * 1e3
    return result
