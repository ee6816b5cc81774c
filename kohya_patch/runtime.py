"""Run-time state of a patched sd-scripts process: settings, selection with fallback, statistics.

Nothing here may end a training run: a selection that fails warns once and the caller
falls back to stock noise.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading

import torch

import immiscible

from .options import Settings, settings_from_args

logger = logging.getLogger(__name__)

#: Set to a folder to make every selection append a JSON line to ``FOLDER/rank{R}.jsonl``.
DUMP_ENV = "IMMISCIBLE_KOHYA_DUMP"
#: How many frames above a patch point to look for the trainer's ``is_train`` argument.
_VALIDATION_FRAME_DEPTH = 8


class _State:
    def __init__(self):
        self.settings: Settings | None = None
        self.backend: str | None = None
        self.lock = threading.Lock()
        self.warned: set[str] = set()
        self.calls = 0
        self.red_sum = 0.0
        self.red_count = 0
        self.window_logged = False
        self.last_reduction: float | None = None


STATE = _State()


def warn_once(key: str, msg: str, *fmt) -> None:
    if key not in STATE.warned:
        STATE.warned.add(key)
        logger.warning(msg, *fmt)


def configure(settings: Settings, backend: str | None = None) -> None:
    """Make ``settings`` the process's settings; ``backend`` is the resolved one, if known."""
    STATE.settings = settings
    STATE.backend = backend


def reset() -> None:
    """Forget settings and statistics (tests)."""
    global STATE
    STATE = _State()


def settings_for(args) -> Settings | None:
    """The configured settings, configuring lazily from ``args`` if start-up validation never ran.

    A start-up check that was skipped must not kill the run later: a bad value then warns once
    and disables selection.
    """
    if STATE.settings is None and args is not None and hasattr(args, "immiscible_k"):
        try:
            configure(settings_from_args(args))
        except (TypeError, ValueError) as exc:
            warn_once("lazy-config", "immiscible: %s; using stock noise", exc)
            configure(Settings())
    return STATE.settings


def active(args) -> bool:
    s = settings_for(args)
    return s is not None and s.enabled


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (torch.distributed if initialized, else env)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - fall through to the environment
        pass
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def in_validation() -> bool:
    """True when a calling trainer frame has ``is_train`` bound to False (sd-scripts' validation)."""
    frame = sys._getframe(2)
    for _ in range(_VALIDATION_FRAME_DEPTH):
        if frame is None:
            return False
        if "is_train" in frame.f_code.co_varnames:
            value = frame.f_locals.get("is_train", True)
            return value is False
        frame = frame.f_back
    return False


def select(latents: torch.Tensor, point: str) -> torch.Tensor | None:
    """Selected noise for ``latents``, or None for "use stock noise" (off, validation, failure).

    The seed is drawn from torch's default generator (so ``--seed`` governs it) and, under
    multi-process training, mixed with the process rank so that ranks use different pools.
    """
    s = STATE.settings
    if s is None or not s.enabled:
        return None
    if not s.validation and in_validation():
        return None
    try:
        seed = drawn = immiscible.draw_seed()
        rank, world = distributed_rank()
        if world > 1:
            seed = immiscible.derive_seed(drawn, rank)
        noise, info = immiscible.select_noise(latents, s.k, seed=seed, mode=s.mode, metric=s.metric,
                                              backend=s.backend, return_info=True)
    except Exception as exc:  # noqa: BLE001 - never end a run
        warn_once(f"select:{type(exc).__name__}",
                  "immiscible: selection failed at %s (%s: %s); using stock noise for this batch (warned once)",
                  point, type(exc).__name__, exc)
        return None
    _record(info, point, rank, world, drawn, seed)
    return noise


def _record(info, point, rank, world, drawn, seed) -> None:
    reduction = info.reduction_per_sample.detach().float().sum().item()
    with STATE.lock:
        STATE.calls += 1
        if STATE.window_logged:
            STATE.red_sum, STATE.red_count, STATE.window_logged = 0.0, 0, False
        STATE.red_sum += reduction
        STATE.red_count += int(info.index.numel())
    dump = os.environ.get(DUMP_ENV)
    if logger.isEnabledFor(logging.DEBUG) or dump:
        row = {"point": point, "call": STATE.calls, "rank": rank, "world_size": world, "drawn_seed": drawn,
               "seed": seed, "k": info.k, "mode": info.mode, "metric": info.metric, "backend": info.backend,
               "index": info.index.tolist(), "reduction": info.reduction}
        logger.debug("immiscible selection %s", row)
        if dump:
            try:
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"rank{rank}.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as exc:
                warn_once("dump", "immiscible: cannot write %s: %s", dump, exc)


def reduction_for_log() -> float | None:
    """Mean reduction over the selections since the previous logging step (None if none).

    Several trackers logging the same step all get the same value; the next selection starts
    a new window.
    """
    with STATE.lock:
        if STATE.red_count:
            STATE.last_reduction = STATE.red_sum / STATE.red_count
            STATE.window_logged = True
            return STATE.last_reduction
        return None
