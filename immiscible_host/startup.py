"""Start-up of a training run: validate the options, check the needed patch point, resolve the
backend, log one summary line. An adapter calls :func:`start_up` from the host's own argument
checks (sd-scripts: ``read_config_from_file`` / ``verify_training_args``).

Errors are raised as ``ValueError`` or, given the host's parser, reported with ``parser.error``
(exit code 2), so a bad value stops the run before any model loads.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

import immiscible

from .options import Settings, settings_from_args
from .points import NOISE_KINDS, PatchPoint, PointStatus, point_for_script
from .ranks import distributed_rank

logger = logging.getLogger(__name__)


def running_script() -> str:
    """Base name of the script this process runs (``"train_network.py"``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    return os.path.basename(path or "")


def summary(settings: Settings, backend: str, points: list[str]) -> str:
    """The one-line start-up summary."""
    where = ", ".join(points) if points else "none"
    val = "selected" if settings.validation else "stock"
    coarse = f"{settings.coarse}x{settings.coarse}" if settings.coarse else "off"
    return (f"immiscible: k={settings.k} mode={settings.mode} metric={settings.metric} coarse={coarse} "
            f"backend={backend} (asked {settings.backend}) validation noise={val}; patch points active: {where}")


def active_noise_points(points, statuses: dict[str, PointStatus]) -> list[str]:
    return [p.name for p in points if p.kind in NOISE_KINDS and p.name in statuses and statuses[p.name].ok]


def guard_check(runtime, guard: str, hint):
    """An ``extra_checks`` entry: selection on needs the first-step guard ``guard`` (a patch point's
    name), because without it a drifted run could train on stock noise. ``hint()`` ends the message.

    (The guard's status is recorded when the host module that holds it is imported, which every
    run's start-up comes from; a process that never imported it has nothing to guard.)
    """
    def check_guard(args, settings: Settings) -> None:
        if not settings.enabled:
            return
        status = runtime.points.get(guard)
        if status is not None and not status.ok:
            raise ValueError(f"immiscible: the first-step guard {guard} is unavailable ({status}), so a run that is "
                             f"not selected could not be stopped; refusing --immiscible_k {settings.k}. {hint()}")
    return check_guard


def start_up(runtime, args, points, *, parser=None, script: str | None = None, extra_checks=(),
             point_status=None, on_enabled=None, config_file_attr: str = "config_file",
             unavailable_hint=None) -> Settings:
    """Validate, check the point the running script needs, configure ``runtime``, log the summary.

    Parameters
    ----------
    runtime : Runtime
    args : argparse.Namespace
    points : the adapter's table of :class:`PatchPoint`
    parser : argparse.ArgumentParser, optional
        Errors go through ``parser.error`` (exit 2) when given, else raise ``ValueError``.
    script : str, optional
        The running script's base name (default: :func:`running_script`).
    extra_checks : callables ``(args, settings)`` raising ``TypeError``/``ValueError``
    point_status : callable ``(point) -> PointStatus | None``, optional
        Refreshes a point's status before it is checked (inline points read the script's source);
        None keeps the status the patcher recorded.
    on_enabled : callable ``(point)``, optional
        Called when selection is on, with the needed point (None when the script is unknown).
    unavailable_hint : str or zero-argument callable, optional
        Appended to the error for an unavailable needed point (the host's version, what to do).

    A missing needed point is an error when selection is on and a warning (once) when it is off.
    Idempotent; the summary is logged once per settings, on rank 0.
    """
    fail = parser.error if parser is not None else None

    def stop(msg, cause=None):
        if fail:
            fail(msg)
        raise ValueError(msg) from cause

    try:
        settings = settings_from_args(args)
        for check in extra_checks:
            check(args, settings)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if getattr(args, config_file_attr, None):
            msg += f" (set in --{config_file_attr} {getattr(args, config_file_attr)} or on the command line)"
        stop(msg, exc)
    script = running_script() if script is None else script
    needed: PatchPoint | None = point_for_script(points, script)
    if needed is not None:
        fresh = point_status(needed) if point_status is not None else None
        if fresh is not None:
            runtime.points[needed.name] = fresh
        status = runtime.points.get(needed.name)
        problem = "its module was not imported" if status is None else (None if status.ok else str(status))
        if problem is not None:
            msg = f"immiscible: patch point {needed.name} needed by {script} is unavailable: {problem}"
            if settings.enabled:
                if unavailable_hint:
                    msg += " " + (unavailable_hint() if callable(unavailable_hint) else unavailable_hint)
                stop(msg)
            runtime.warn_once(f"missing:{needed.name}", "%s (immiscible is off, carrying on)", msg)
    backend = None
    if settings.enabled:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            backend = immiscible.resolve_backend(settings.backend, device)
        except (ImportError, ValueError) as exc:
            stop(f"--immiscible_backend {settings.backend}: {exc}", exc)
        if on_enabled is not None:
            on_enabled(needed)
    first = runtime.settings != settings
    runtime.configure(settings, backend)
    if settings.enabled and first and distributed_rank()[0] == 0:
        logger.info(summary(settings, backend, active_noise_points(points, runtime.points)))
    return settings
