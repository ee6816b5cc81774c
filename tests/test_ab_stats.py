"""The A/B statistics (immiscible_host/abtest.py): t quantiles, the per-seed effect, the interval's coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest

from immiscible_host import abtest


@pytest.mark.parametrize("df, q975", [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (9, 2.262157163),
                                      (30, 2.042272456)])
def test_t_quantile_matches_published_tables(df, q975):
    assert abtest.t_quantile(0.975, df) == pytest.approx(q975, rel=1e-7)
    assert abtest.t_quantile(0.025, df) == pytest.approx(-q975, rel=1e-7)
    assert abtest.t_cdf(q975, df) == pytest.approx(0.975, abs=1e-9)


def test_log_ratio_of_means_is_zero_for_equal_arms_and_signed():
    c = [1.0, 2.0, 3.0]
    assert abtest.log_ratio_of_means(c, c) == 0.0
    assert abtest.log_ratio_of_means([2.0, 4.0, 6.0], c) == pytest.approx(math.log(2))
    assert abtest.log_ratio_of_means([0.5, 1.0, 1.5], c) < 0
    with pytest.raises(ValueError, match="same non-empty"):
        abtest.log_ratio_of_means([1.0], c)


def test_no_interval_and_no_detectable_effect_under_three_seeds():
    assert abtest.t_interval([0.01, -0.02]) is None
    assert abtest.minimal_detectable_effect(0.01, 2) is None
    text = abtest.verdict([0.01, -0.02], None, None)
    assert "no interval" in text and "3 seeds" in text


def test_interval_width_follows_n_minus_one_degrees_of_freedom():
    iv = abtest.t_interval([0.0, 0.1, 0.2])
    assert iv.mean == pytest.approx(0.1) and iv.sd == pytest.approx(0.1)
    assert iv.high - iv.mean == pytest.approx(4.302652730 * 0.1 / math.sqrt(3), rel=1e-7)


def test_the_95_percent_interval_covers_a_known_effect_92_to_98_percent_of_the_time():
    """400 synthetic A/Bs of 3 to 6 seeds, 24 validation items each, with a known effect on the
    mean loss and a run-to-run spread per seed: the interval over the per-seed log ratios covers it."""
    rng = np.random.default_rng(20261206)
    effect = math.log(0.97)                                  # the treatment lowers the mean loss by 3 %
    covered = 0
    experiments = 400
    for e in range(experiments):
        n = 3 + e % 4
        base = rng.gamma(2.0, 0.05, size=24)                 # per-item loss levels, the same items in both arms
        effects = []
        for _ in range(n):
            run = rng.normal(0.0, 0.02, size=2)              # each training run's own luck
            control = base * np.exp(run[0])
            treatment = base * np.exp(effect + run[1])
            effects.append(abtest.log_ratio_of_means(treatment, control))
        iv = abtest.t_interval(effects)
        covered += iv.low <= effect <= iv.high
    assert 0.92 <= covered / experiments <= 0.98, covered / experiments


def test_the_verdict_names_direction_bias_and_detectable_effect():
    iv = abtest.t_interval([-0.05, -0.04, -0.06])
    mde = abtest.minimal_detectable_effect(iv.sd, iv.n)
    text = abtest.verdict([-0.05, -0.04, -0.06], iv, mde)
    assert text.startswith("The treatment lowers") and "stock noise" in text and "detect" in text
    iv = abtest.t_interval([-0.05, 0.04, 0.01])
    assert abtest.verdict([-0.05, 0.04, 0.01], iv, None).startswith("No detectable difference")
    assert "exactly 0" in abtest.verdict([0.0, 0.0], None, None, self_test=True)
    assert "FAILED" in abtest.verdict([0.0, 1e-9], None, None, self_test=True)


def test_step_time_leaves_validation_out_and_overhead_uses_medians():
    # control: steps of 1 s, a 9 s validation pass after the third step, and one slow step (a sample, 6 s)
    times = [1, 2, 3, 12, 13, 19, 20]
    kinds = [True, True, True, False, True, True, True]
    control = abtest.step_durations(times, kinds)
    assert control.tolist() == [1, 1, 1, 6, 1]
    treatment = abtest.step_durations([1.5, 3, 4.5, 13.5, 15, 16.5], [True, True, True, False, True, True])
    extra, frac = abtest.step_overhead(treatment, control)
    assert extra == pytest.approx(0.5) and frac == pytest.approx(0.5)
    assert abtest.step_overhead([], control) is None
