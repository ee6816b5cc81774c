"""What a run shows of the selection: ``immiscible/reduction`` in the trackers, and selection dumps.

:class:`ReductionWindow` averages ``1 - d(chosen) / mean d(candidates)`` over the samples
selected since the previous loss log (none selected: no value). :func:`wrap_tracker` makes an accelerate tracker add
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
    """Mean per-sample reduction of the selections made since the previous loss log (thread-safe).

    A loss log (:meth:`for_log`) closes the window: it gets the mean of the selections added since
    the previous loss log, or None when there were none (a step whose batches all fell back to
    stock noise reports no reduction, not the previous step's). Several trackers logging the same
    step all get the same value: accelerate's ``Accelerator.log(values, step=...)`` calls every
    tracker's ``log`` with the same ``values`` object and the same ``step``, so a call with the
    step of the closed window (or, with no step, the very same ``values`` object) and no selection
    added since is the same log and gets the closed window's value again.
    """

    def __init__(self):
        self.lock = threading.Lock()
        #: The open window: selections added since the last loss log.
        self.sum = 0.0
        self.count = 0
        #: The value the last loss log got (None: nothing was selected in its window).
        self.last: float | None = None
        self._closed = False
        self._step = None
        self._values = None

    def add(self, reduction_sum: float, samples: int) -> None:
        with self.lock:
            self.sum += reduction_sum
            self.count += samples

    def for_log(self, step=None, values=None) -> float | None:
        """The reduction a loss log at ``step`` carrying ``values`` reports (None: nothing selected).

        A new log closes the window; a repeat of the closed log (same ``step``, or with no step the
        same ``values`` object, and no selection since) gets the same value again. With neither
        ``step`` nor ``values`` every call is a new log.
        """
        with self.lock:
            if self._closed and self.count == 0 and (
                    (step is not None and step == self._step)
                    or (step is None and values is not None and values is self._values)):
                return self.last
            self.last = self.sum / self.count if self.count else None
            self.sum, self.count = 0.0, 0
            # the values object is kept (not only its id) so that its id cannot be reused by a later log
            self._closed, self._step, self._values = True, step, (values if step is None else None)
            return self.last


def add_reduction(values, window: ReductionWindow, loss_keys=LOSS_KEYS, extra=None, step=None):
    """``values`` plus ``immiscible/reduction`` when it is a loss log and there is a value to add.

    ``step``: the step the log is for (accelerate passes it to every tracker); ``extra``: a
    zero-argument callable returning more entries for every loss log (e.g. the stock-batch
    count), or None.
    """
    if isinstance(values, dict) and any(key in values for key in loss_keys):
        red = window.for_log(step, values)
        more = dict(extra()) if extra is not None else {}
        if red is not None:
            more[REDUCTION_KEY] = red
        if more:
            return {**values, **more}
    return values


def wrap_tracker(tracker, window: ReductionWindow, loss_keys=LOSS_KEYS, extra=None) -> None:
    """Make ``tracker.log`` add the reduction (idempotent; a tracker refusing attributes goes without).

    accelerate calls ``tracker.log(values, step=step, **kwargs)``; a positional step is read too.
    """
    log = getattr(tracker, "log", None)
    if log is None or is_patched(log):
        return

    @functools.wraps(log)
    def tracker_log(values, *a, **kw):
        step = kw.get("step", a[0] if a else None)
        return log(add_reduction(values, window, loss_keys, extra, step=step), *a, **kw)

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


def dump_tensors(folder: str, rank: int, call: int, **tensors) -> None:
    """Save ``tensors`` (CPU copies) as ``folder/rank{rank}_call{call}.pt`` beside the JSON lines, so a
    test can recompute a selection from the very latents it was made for (raises ``OSError``)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    torch.save({name: t.detach().cpu() for name, t in tensors.items()}, os.path.join(folder, f"rank{rank}_call{call}.pt"))
