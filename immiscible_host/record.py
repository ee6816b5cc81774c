"""The in-process recorder of an A/B run: every loss the trainer computes, with the timesteps it used.

A ``RECORD`` patch point is the host's per-element loss function (sd-scripts:
``train_util.conditional_loss(model_pred, target, loss_type, reduction, huber_c)``). When the
environment variable :data:`RECORD_ENV` names a folder, its wrapper appends one JSON line per call
to ``FOLDER/record.rank{R}.jsonl``:

- ``"pass"``: ``"train"`` or ``"val"`` (a calling frame has the host's validation argument bound to
  False, as :meth:`Runtime.in_validation` finds it);
- ``"train_calls"``: the training calls recorded before this one (a validation pass's rows carry the
  training calls that preceded it, so its step is ``train_calls / gradient accumulation``);
- ``"loss"``: the per-item mean of the returned loss (before per-image weights, masks and
  timestep weighting such as min-SNR);
- ``"timesteps"``: the caller's ``timesteps`` local, the timesteps actually used (flow models pick
  their own even in validation);
- ``"items"``: a 64-bit hash of each item's ``latents`` (the caller's local), so two runs' image
  orders compare without knowing the dataset;
- ``"t"``: ``time.perf_counter()`` after the call (step durations are differences of training rows).

Without the variable the wrapper calls straight through. Recording draws no random number and
changes no tensor, so a recorded run trains exactly as an unrecorded one.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
import time

import torch

from .patching import mark
from .ranks import distributed_rank

#: The environment variable naming the folder the recorder writes to (unset: no recording).
RECORD_ENV = "IMMISCIBLE_RECORD"
#: The file each rank writes in that folder.
RECORD_FILE = "record.rank{rank}.jsonl"
#: Calling frames searched for the caller's locals.
FRAME_DEPTH = 4


def caller_local(name: str, depth: int = FRAME_DEPTH, start: int = 2):
    """The first ``name`` local in the calling frames (``start`` frames up; None if none has it)."""
    frame = sys._getframe(start)
    for _ in range(depth):
        if frame is None:
            return None
        if name in frame.f_locals:
            return frame.f_locals[name]
        frame = frame.f_back
    return None


def per_item_mean(loss) -> list[float]:
    """The mean of ``loss`` over every dimension but the first, per item (a scalar: one item)."""
    t = loss.detach().float()
    if t.ndim == 0:
        return [t.item()]
    return t.reshape(t.shape[0], -1).mean(dim=1).tolist()


def item_hashes(latents) -> list[str] | None:
    """A 64-bit hex hash of each item of ``latents`` (its bytes, dtype and shape); None if not a tensor."""
    if not isinstance(latents, torch.Tensor) or latents.ndim == 0:
        return None
    t = latents.detach().to("cpu").contiguous()
    out = []
    for item in t:
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{item.dtype}{tuple(item.shape)}".encode())
        h.update(item.reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append(h.hexdigest())
    return out


def as_list(timesteps):
    """Timesteps as a JSON-ready list (a tensor, an array, a number; None stays None)."""
    if timesteps is None:
        return None
    if isinstance(timesteps, torch.Tensor):
        return timesteps.detach().to("cpu").reshape(-1).tolist()
    if hasattr(timesteps, "tolist"):
        return timesteps.tolist()
    return [timesteps]


class Recorder:
    """Appends the rows described above to ``folder/record.rank{R}.jsonl`` (one per process)."""

    def __init__(self, folder: str, rank: int | None = None):
        self.folder = folder
        self.rank = distributed_rank()[0] if rank is None else rank
        self.path = os.path.join(folder, RECORD_FILE.format(rank=self.rank))
        self.train_calls = 0
        self.lock = threading.Lock()

    def row(self, loss, validation: bool, timesteps, latents) -> dict:
        with self.lock:
            row = {"pass": "val" if validation else "train", "train_calls": self.train_calls,
                   "loss": per_item_mean(loss), "timesteps": as_list(timesteps), "items": item_hashes(latents),
                   "t": time.perf_counter()}
            if not validation:
                self.train_calls += 1
        return row

    def write(self, row: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


_RECORDERS: dict[str, Recorder] = {}


def recorder() -> Recorder | None:
    """This process's recorder when :data:`RECORD_ENV` is set, else None."""
    folder = os.environ.get(RECORD_ENV)
    if not folder:
        return None
    if folder not in _RECORDERS:
        _RECORDERS[folder] = Recorder(folder)
    return _RECORDERS[folder]


def read_rows(folder: str, rank: int = 0) -> list[dict]:
    """The rows a recorder wrote in ``folder`` for ``rank`` (a torn last line, from a killed run, is left out)."""
    path = os.path.join(folder, RECORD_FILE.format(rank=rank))
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break
    except FileNotFoundError:
        pass
    return rows


def recording_loss(original, point, adapter):
    """``loss_fn(model_pred, target, ...) -> loss``: with :data:`RECORD_ENV` set, each call's per-item loss,
    pass (training or validation), the caller's timesteps and latents are appended to the record."""
    runtime = adapter.runtime

    @functools.wraps(original)
    def wrapper(*a, **kw):
        out = original(*a, **kw)
        rec = recorder()
        if rec is not None and isinstance(out, torch.Tensor):
            try:
                rec.write(rec.row(out, runtime.in_validation(), caller_local("timesteps"), caller_local("latents")))
            except Exception as exc:  # noqa: BLE001 - recording must never end a run
                runtime.warn_once("record", "immiscible: cannot record the loss (%s: %s)", type(exc).__name__, exc)
        return out

    return mark(wrapper, original)
