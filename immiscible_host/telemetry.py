"""What a run shows of the selection: ``immiscible/reduction`` in the trackers, and selection dumps.

:class:`ReductionWindow` averages ``1 - d(chosen) / mean d(candidates)`` over the samples
selected since the previous logging step. :func:`wrap_tracker` makes an accelerate tracker add
that value to every log call that carries the loss; :func:`wrap_init_trackers` does it for every
tracker an ``Accelerator`` starts. :func:`dump_row` appends one JSON line per selection.
"""
from __future__ import annotations

import functools
import json
import os
import threading

from .patching import is_patched, mark

#: The tracker log entry this package adds.
REDUCTION_KEY = "immiscible/reduction"
#: The running count of batches that fell back to stock noise, logged with the loss.
STOCK_KEY = "immiscible/stock_batches"
#: A logged dict holding one of these keys is the per-step loss log that the reduction joins.
LOSS_KEYS = ("loss/current", "loss")


class ReductionWindow:
    """Mean per-sample reduction since the last :meth:`for_log` (thread-safe).

    Several trackers logging the same step all get the same value; the next selection after a
    logging step starts a new window.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.sum = 0.0
        self.count = 0
        self.logged = False
        self.last: float | None = None

    def add(self, reduction_sum: float, samples: int) -> None:
        with self.lock:
            if self.logged:
                self.sum, self.count, self.logged = 0.0, 0, False
            self.sum += reduction_sum
            self.count += samples

    def for_log(self) -> float | None:
        """The window's mean (None if nothing was selected); closes the window."""
        with self.lock:
            if self.count:
                self.last = self.sum / self.count
                self.logged = True
                return self.last
            return None


def add_reduction(values, window: ReductionWindow, loss_keys=LOSS_KEYS, extra=None):
    """``values`` plus ``immiscible/reduction`` when it is a loss log and there is a value to add.

    ``extra``: a zero-argument callable returning more entries for every loss log (e.g. the
    stock-batch count), or None.
    """
    if isinstance(values, dict) and any(key in values for key in loss_keys):
        red = window.for_log()
        more = dict(extra()) if extra is not None else {}
        if red is not None:
            more[REDUCTION_KEY] = red
        if more:
            return {**values, **more}
    return values


def wrap_tracker(tracker, window: ReductionWindow, loss_keys=LOSS_KEYS, extra=None) -> None:
    """Make ``tracker.log`` add the reduction (idempotent; a tracker refusing attributes goes without)."""
    log = getattr(tracker, "log", None)
    if log is None or is_patched(log):
        return

    @functools.wraps(log)
    def tracker_log(values, *a, **kw):
        return log(add_reduction(values, window, loss_keys, extra), *a, **kw)

    try:
        tracker.log = mark(tracker_log, log)
    except Exception:  # noqa: BLE001
        pass


def wrap_init_trackers(original, runtime):
    """``Accelerator.init_trackers``: once trackers start, they log ``runtime``'s reduction and its
    running count of stock batches (``immiscible/stock_batches``), k > 1 only."""

    @functools.wraps(original)
    def init_trackers(self, *a, **kw):
        out = original(self, *a, **kw)
        if runtime.enabled:
            for tracker in getattr(self, "trackers", []):
                wrap_tracker(tracker, runtime.window, extra=lambda: {STOCK_KEY: runtime.stock_batches})
        return out

    return mark(init_trackers, original)


def dump_row(folder: str, rank: int, row: dict) -> None:
    """Append ``row`` as one JSON line to ``folder/rank{rank}.jsonl`` (raises ``OSError``)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{rank}.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
