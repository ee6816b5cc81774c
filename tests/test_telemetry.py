"""``immiscible/reduction`` in the trackers (issue 17 item 1): a loss log reports the selections made
since the previous loss log, nothing when there were none, and every tracker of one log the same."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from immiscible_host import telemetry
from immiscible_host.telemetry import REDUCTION_KEY, STOCK_KEY, ReductionWindow, add_reduction


class Tracker:
    """An accelerate ``GeneralTracker``'s logging surface: ``log(values, step=None, **kwargs)``."""

    def __init__(self, name):
        self.name, self.logged = name, []

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


class Accelerator:
    """What sd-scripts and musubi-tuner call: accelerate's ``Accelerator.log`` passes the SAME ``values``
    object and the same ``step`` to every tracker (accelerate/accelerator.py, ``Accelerator.log``)."""

    def __init__(self, names=("tensorboard", "wandb")):
        self.trackers = []
        self.names = names

    def init_trackers(self, project_name):
        self.trackers = [Tracker(n) for n in self.names]

    def log(self, values, step=None, log_kwargs={}):  # noqa: B006 - accelerate's own signature
        for tracker in self.trackers:
            tracker.log(values, step=step, **log_kwargs.get(tracker.name, {}))


def started(runtime, names=("tensorboard", "wandb")):
    acc = Accelerator(names)
    telemetry.wrap_init_trackers(Accelerator.init_trackers, runtime)(acc, "run")
    return acc


def runtime():
    """The part of ``Runtime`` the trackers read (the real one imports torch)."""
    return SimpleNamespace(enabled=True, window=ReductionWindow(), stock_batches=0)


def test_a_log_after_no_selection_reports_none():
    """The issue's reproduction: add once, then two loss logs; the second had no selection."""
    w = ReductionWindow()
    w.add(0.5, 1)
    assert add_reduction({"loss/current": 1.0}, w)[REDUCTION_KEY] == 0.5
    assert REDUCTION_KEY not in add_reduction({"loss/current": 1.0}, w)
    assert w.for_log() is None and w.for_log(step=7) is None


def test_a_fallback_step_logs_no_reduction_and_the_stock_count():
    """Step 1 selected (0.128), step 2 fell back to stock noise: step 2 shows no reduction in any tracker."""
    rt = runtime()
    acc = started(rt)
    rt.window.add(0.256, 2)
    acc.log({"loss/current": 1.0, "lr": 1e-4}, step=1)
    rt.stock_batches += 1  # Runtime.stock(): the batch used stock noise, nothing was added to the window
    acc.log({"loss/current": 0.9, "lr": 1e-4}, step=2)
    rt.window.add(0.1, 1)
    acc.log({"loss/current": 0.8, "lr": 1e-4}, step=3)
    for tracker in acc.trackers:
        (s1, v1), (s2, v2), (s3, v3) = tracker.logged
        assert (s1, s2, s3) == (1, 2, 3)
        assert v1[REDUCTION_KEY] == pytest.approx(0.128) and v1[STOCK_KEY] == 0
        assert REDUCTION_KEY not in v2 and v2[STOCK_KEY] == 1
        assert v3[REDUCTION_KEY] == pytest.approx(0.1) and v3[STOCK_KEY] == 1


@pytest.mark.parametrize("step", [5, None])
def test_every_tracker_of_one_log_gets_the_same_value(step):
    """Three trackers, one ``Accelerator.log``: with a step, and with none (wandb's own step counter)."""
    rt = runtime()
    acc = started(rt, ("tensorboard", "wandb", "comet_ml"))
    for r in (0.5, 0.1, 0.3, 0.3):  # gradient accumulation: several selections, one log
        rt.window.add(r, 1)
    acc.log({"loss/current": 1.0}, step=step)
    assert [t.logged[0][1][REDUCTION_KEY] for t in acc.trackers] == [pytest.approx(0.3)] * 3
    acc.log({"loss/current": 1.0}, step=None if step is None else step + 1)  # next step: nothing selected
    assert [REDUCTION_KEY in t.logged[1][1] for t in acc.trackers] == [False] * 3


def test_two_loss_logs_of_one_step_agree():
    """Two ``Accelerator.log`` calls for the same step, each carrying the loss, report the same window."""
    w = ReductionWindow()
    w.add(0.2, 1)
    assert add_reduction({"loss": 1.0}, w, step=4)[REDUCTION_KEY] == 0.2
    assert add_reduction({"loss/current": 1.0}, w, step=4)[REDUCTION_KEY] == 0.2
    assert REDUCTION_KEY not in add_reduction({"loss/current": 1.0}, w, step=5)
    w.add(0.6, 2)  # a selection after the close opens a new window even if a caller repeats a step
    assert add_reduction({"loss/current": 1.0}, w, step=5)[REDUCTION_KEY] == pytest.approx(0.3)


def test_logs_without_the_loss_leave_the_window_open():
    w = ReductionWindow()
    w.add(0.4, 1)
    assert add_reduction({"lr": 1e-4}, w, step=1) == {"lr": 1e-4}
    assert add_reduction({"loss/epoch": 1.0}, w, step=1) == {"loss/epoch": 1.0}
    assert add_reduction({"loss/current": 1.0}, w, step=1)[REDUCTION_KEY] == 0.4


def test_a_positional_step_is_read():
    w = ReductionWindow()
    tracker = Tracker("t")
    telemetry.wrap_tracker(tracker, w)
    telemetry.wrap_tracker(tracker, w)  # idempotent
    w.add(0.5, 1)
    tracker.log({"loss": 1.0}, 1)
    tracker.log({"loss": 1.0}, 1)
    tracker.log({"loss": 1.0}, 2)
    assert [REDUCTION_KEY in v for _, v in tracker.logged] == [True, True, False]


def test_a_reused_values_dict_without_a_step_is_one_log_only_until_the_next_selection():
    """With no step the closed log is recognised by its ``values`` object; a selection after it always
    starts a new window."""
    w = ReductionWindow()
    logs = {"loss": 1.0}
    w.add(0.5, 1)
    assert add_reduction(logs, w)[REDUCTION_KEY] == 0.5
    assert add_reduction(logs, w)[REDUCTION_KEY] == 0.5  # the next tracker of the same log
    w.add(0.1, 1)
    assert add_reduction(logs, w)[REDUCTION_KEY] == pytest.approx(0.1)


def test_the_window_is_thread_safe():
    w = ReductionWindow()
    threads = [threading.Thread(target=lambda: [w.add(0.5, 1) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert w.for_log(step=1) == 0.5 and w.for_log(step=1) == 0.5 and w.for_log(step=2) is None


def test_trackers_are_wrapped_only_when_selection_is_on():
    rt = runtime()
    rt.enabled = False
    acc = started(rt)
    rt.window.add(0.5, 1)
    acc.log({"loss": 1.0}, step=1)
    assert all(t.logged == [(1, {"loss": 1.0})] for t in acc.trackers)
