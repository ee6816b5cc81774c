"""Statistics of an A/B of two training arms (control and treatment), the seed as the unit.

Per seed ``s`` the effect is ``d_s = log(mean L_treatment / mean L_control)`` over the same
validation items and timesteps (:func:`log_ratio_of_means`); negative is better for the treatment.
Across seeds a Student-t interval with ``n - 1`` degrees of freedom (:func:`t_interval`) and, with
fewer than :data:`MIN_SEEDS_FOR_INTERVAL` seeds, no interval at all. The smallest effect the run
could have detected (:func:`minimal_detectable_effect`), the selection's time per step
(:func:`step_overhead`) and the verdict's words (:func:`verdict`) come from here too. Pure
functions of numbers: standard library and NumPy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Fewer seeds than this: no interval (one seed has no spread; two give one degree of freedom).
MIN_SEEDS_FOR_INTERVAL = 3
#: What the validation loss measures, and what it leans towards (the verdict's standing caveat).
BIAS = ("The measure leans towards the control: the validation loss uses stock noise, which is the control's own "
        "training objective, while the treatment learns a slightly different pairing of noise and image. Parity "
        "or better is informative; a small deficit is expected and is not by itself evidence of harm.")
NOT_MEASURED = ("Not measured: sample quality (look at the sample sheet), and any effect smaller than the "
                "detectable effect below.")


def log_ratio_of_means(treatment, control) -> float:
    """``log(mean(treatment) / mean(control))``: one seed's effect (the same items, both arms)."""
    t, c = np.asarray(treatment, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if t.shape != c.shape or t.size == 0:
        raise ValueError(f"the arms must have the same non-empty set of losses, got {t.shape} and {c.shape}")
    return float(np.log(t.mean()) - np.log(c.mean()))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    sd: float
    n: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0


def t_interval(values, level: float = 0.95) -> Interval | None:
    """The Student-t interval of the mean of ``values`` (``n - 1`` degrees of freedom); None with fewer
    than :data:`MIN_SEEDS_FOR_INTERVAL` values."""
    v = np.asarray(values, dtype=np.float64)
    n = int(v.size)
    if n < MIN_SEEDS_FOR_INTERVAL:
        return None
    mean, sd = float(v.mean()), float(v.std(ddof=1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd, n, level)


def minimal_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest true mean effect a two-sided t-test over ``n`` seeds with spread ``sd`` detects with
    probability ``power`` at level ``alpha``: ``(t_{1-alpha/2} + t_{power}) * sd / sqrt(n)``, ``n - 1`` df."""
    if n < MIN_SEEDS_FOR_INTERVAL:
        return None
    return (t_quantile(1.0 - alpha / 2.0, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def step_durations(times, is_step) -> np.ndarray:
    """Seconds of each step from the end times of a run's recorded calls in order (``is_step``: which
    are training steps; the others are validation calls): a step's time starts where the previous call
    of any kind ended, so a validation pass before a step does not count as that step's time."""
    t = np.asarray(times, dtype=np.float64)
    mask = np.asarray(is_step, dtype=bool)
    if t.size < 2:
        return np.zeros(0)
    return np.diff(t)[mask[1:]]


def step_overhead(treatment_durations, control_durations) -> tuple[float, float] | None:
    """The treatment's extra time per step, ``(seconds, fraction of the control's)``, from median step
    durations (medians: the steps that include a validation pass or a sample do not move them)."""
    t, c = np.asarray(treatment_durations, dtype=np.float64), np.asarray(control_durations, dtype=np.float64)
    if t.size == 0 or c.size == 0:
        return None
    mt, mc = float(np.median(t)), float(np.median(c))
    return mt - mc, (mt - mc) / mc if mc > 0 else float("nan")


def percent(d: float) -> float:
    """A log ratio as a percent change of the mean loss."""
    return 100.0 * math.expm1(d)


def verdict(effects, interval: Interval | None, mde: float | None, self_test: bool = False) -> str:
    """One paragraph: what the seeds' effects say, with the interval or why there is none."""
    effects = [float(d) for d in effects]
    if self_test:
        zero = all(d == 0.0 for d in effects)
        return ("Self-test (A/A): both arms ran the same settings; every per-seed difference is exactly 0, so the "
                "A/B is deterministic on this setup and any difference in a real A/B is the treatment's."
                if zero else "Self-test (A/A) FAILED: the two arms ran the same settings but their validation losses "
                "differ, so this setup is not deterministic and an A/B on it cannot separate the treatment from "
                "run-to-run noise (check the trainer's determinism options, cuDNN, data loader workers).")
    if interval is None:
        return (f"{len(effects)} seed(s): no interval (it needs at least {MIN_SEEDS_FOR_INTERVAL} seeds; 5 are "
                "recommended). The per-seed differences are listed but are not evidence either way.")
    span = f"{percent(interval.mean):+.2f} % (95 % interval {percent(interval.low):+.2f} % to {percent(interval.high):+.2f} %)"
    mde_text = f"; the smallest effect this run could detect is about ±{percent(mde):.2f} %" if mde is not None else ""
    if interval.high < 0.0:
        head = f"The treatment lowers the validation loss: {span}"
    elif interval.low > 0.0:
        head = f"The treatment raises the validation loss: {span}"
    else:
        head = f"No detectable difference in validation loss: {span}"
    return head + mde_text + ". " + BIAS
