"""The two training objectives and their deterministic samplers.

``ddpm`` : epsilon-prediction (Ho et al., 2020), T = 1000, with one of two noise schedules:
           ``scaled-linear`` (the betas 0.00085..0.012 SD / SDXL train with) or ``cosine``
           (Nichol & Dhariwal, 2021, s = 0.008, betas capped at 0.999 as diffusers'
           ``squaredcos_cap_v2``); sampled with DDIM (eta = 0) from the same noise level under
           both (``sampling_start``): Euler's method on the probability-flow ODE in the (x0, eps) parametrization (Song et al., 2021), with the
           predicted x0 optionally clipped to [-1, 1] and eps re-derived from it (guided-diffusion).
``flow`` : rectified flow / flow matching, ``x_t = (1 - t) x0 + t n``, target ``v = n - x0`` as
           FLUX trains; sampled with Euler steps from t = 1 to 0 (Liu et al., 2023).

The noise ``n`` is passed in from outside: this is where a pairing arm acts.
"""
from __future__ import annotations

import torch

OBJECTIVES = ("ddpm", "flow")
SCHEDULES = ("scaled-linear", "cosine")
DDPM_T = 1000


def ddpm_alpha_bar(T: int = DDPM_T, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Cumulative products ``alpha_bar_t`` of SD's scaled-linear beta schedule, shape (T,)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64).square()
    return torch.cumprod(1.0 - betas, 0).to(torch.float32)


def cosine_alpha_bar(T: int = DDPM_T, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """``alpha_bar_t`` of the cosine schedule, shape (T,): ``f(t) = cos((t/T + s)/(1 + s) * pi/2)^2``."""
    import math

    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2).square()
    betas = (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)
    return torch.cumprod(1.0 - betas, 0).to(torch.float32)


def alpha_bar_for(schedule: str) -> torch.Tensor:
    """The ``alpha_bar`` of a named DDPM schedule (``SCHEDULES``)."""
    if schedule == "scaled-linear":
        return ddpm_alpha_bar()
    if schedule == "cosine":
        return cosine_alpha_bar()
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def draw_times(objective: str, batch: int, *, generator: torch.Generator) -> torch.Tensor:
    """Training times: integer steps in [0, T) for ddpm, uniform in [0, 1) for flow -> (B,)."""
    if objective == "ddpm":
        return torch.randint(0, DDPM_T, (batch,), generator=generator)
    return torch.rand(batch, generator=generator)


def noisy_input_and_target(objective: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                           alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, model time in [0, 1], regression target)`` for a batch ``x0`` (B, D) and ``noise`` (B, D)."""
    if objective == "ddpm":
        ab = alpha_bar[t][:, None]
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise, t.to(torch.float32) / DDPM_T, noise
    tt = t[:, None]
    return (1.0 - tt) * x0 + tt * noise, t, noise - x0


def objective_loss(model, objective: str, x0, noise, t, alpha_bar) -> torch.Tensor:
    """Mean squared error of the model's prediction against the objective's target."""
    x_t, time, target = noisy_input_and_target(objective, x0, noise, t, alpha_bar)
    return (model(x_t, time) - target).square().mean()


def sampling_start(alpha_bar: torch.Tensor) -> int:
    """The step DDIM starts from: the last ``t`` whose ``alpha_bar`` is at least SD's terminal one.

    Under SD's scaled-linear schedule that is ``T - 1`` (``alpha_bar = 0.0047``). The cosine
    schedule's betas are capped at 0.999, so its ``alpha_bar[T - 1]`` is 2.4e-9: an
    eps-prediction model's x0 estimate there divides its error by ``sqrt(alpha_bar) = 5e-5``, and
    unclipped DDIM diverges for every model. Both schedules therefore start sampling from the
    same noise level (cosine: ``t = 955``); training still covers every ``t``.
    """
    floor = float(ddpm_alpha_bar()[-1])
    return int((alpha_bar >= floor * (1 - 1e-6)).nonzero().max())


def ddim_timesteps(steps: int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The ``steps`` model times of DDIM, evenly spaced from ``sampling_start`` down ("trailing")."""
    return torch.linspace(sampling_start(alpha_bar), 0, steps + 1)[:-1].round().long()


@torch.no_grad()
def sample_ddim(model, noise: torch.Tensor, steps: int, alpha_bar: torch.Tensor, *, clip: bool = False) -> torch.Tensor:
    """DDIM (eta = 0) from ``noise`` (N, D) at ``sampling_start`` to data in ``steps`` model calls.

    With ``clip`` the predicted x0 is clamped to [-1, 1] (the data range) at every step and the
    noise is re-derived from the clamped x0, ``eps = (x - sqrt(ab) x0) / sqrt(1 - ab)``, as
    OpenAI's guided-diffusion ``ddim_sample(clip_denoised=True)`` does (diffusers:
    ``clip_sample=True, use_clipped_model_output=True``). Keeping the model's own eps instead
    drifts off the trajectory when the model's x0 overshoots: on the demo's digits its 100-step
    samples saturate.
    """
    ts = ddim_timesteps(steps, alpha_bar)
    x = noise
    for i, t in enumerate(ts.tolist()):
        ab = alpha_bar[t]
        eps = model(x, torch.full((x.shape[0],), t / DDPM_T))
        x0_hat = (x - (1.0 - ab).sqrt() * eps) / ab.sqrt()
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            eps = (x - ab.sqrt() * x0_hat) / (1.0 - ab).sqrt()
        ab_next = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = ab_next.sqrt() * x0_hat + (1.0 - ab_next).sqrt() * eps
    return x


@torch.no_grad()
def sample_euler(model, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler's method on ``dx/dt = v(x, t)`` from t = 1 (``noise``, (N, D)) to t = 0 in ``steps`` steps."""
    ts = torch.linspace(1.0, 0.0, steps + 1)
    x = noise
    for t0, t1 in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = x + (t1 - t0) * model(x, torch.full((x.shape[0],), t0))
    return x


#: the samplers of each objective: name -> DDIM x0 clipping (None: Euler, no clipping)
SAMPLERS = {"euler": None, "ddim": False, "ddim-clip": True}


def samplers_for(objective: str, clip: tuple[str, ...] = ("off",)) -> tuple[str, ...]:
    """Sampler names evaluated for ``objective``: Euler for flow; DDIM with x0 clipping off and/or on for ddpm."""
    if objective == "flow":
        return ("euler",)
    return tuple({"off": "ddim", "on": "ddim-clip"}[c] for c in clip)


def sample(model, objective: str, noise: torch.Tensor, steps: int, alpha_bar: torch.Tensor,
           sampler: str | None = None) -> torch.Tensor:
    """Sample with ``sampler`` (default: unclipped DDIM for ddpm, Euler for flow)."""
    if objective == "ddpm":
        return sample_ddim(model, noise, steps, alpha_bar, clip=sampler == "ddim-clip")
    return sample_euler(model, noise, steps)
