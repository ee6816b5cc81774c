"""Start-up of a training run: validate the options, check the needed patch point, resolve the
backend, log one summary line. :meth:`immiscible_host.adapter.Adapter.start_up` runs it from the
host's own argument handling (the table's ``CONFIG`` and ``START_UP`` points).

Errors are raised as ``ValueError`` or, given the host's parser, reported with ``parser.error``
(exit code 2), so a bad value stops the run before any model loads.
"""
from __future__ import annotations

import importlib.util
import logging
import sys

import torch

import immiscible

from .inline import inline_status, intercept_point
from .options import Settings, check_near_misses, settings_from_args
from .points import INLINE, NOISE_KINDS, PatchPoint, PointStatus, broken, point_for_script
from .ranks import distributed_rank

logger = logging.getLogger(__name__)


def summary(settings: Settings, backend: str, points: list[str]) -> str:
    """The one-line start-up summary."""
    where = ", ".join(points) if points else "none"
    val = "selected" if settings.validation else "stock"
    coarse = f"{settings.coarse}x{settings.coarse}" if settings.coarse else "off"
    return (f"immiscible: k={settings.k} mode={settings.mode} metric={settings.metric} coarse={coarse} "
            f"backend={backend} (asked {settings.backend}) scope={settings.scope} validation noise={val}; patch points active: {where}")


def active_noise_points(points, statuses: dict[str, PointStatus]) -> list[str]:
    return [p.name for p in points if p.kind in NOISE_KINDS and p.name in statuses and statuses[p.name].ok]


def check_dependencies(settings: Settings) -> None:
    """``--immiscible_mode assign`` needs scipy: say so before any model loads, not at the first batch."""
    if settings.enabled and settings.mode == "assign" and importlib.util.find_spec("scipy") is None:
        raise ValueError("--immiscible_mode assign needs scipy, which this environment lacks: "
                         "pip install scipy (or use --immiscible_mode knn)")


def check_assign_size(settings: Settings, args, world: int) -> None:
    """``--immiscible_mode assign``: the batch that one assignment solves (a process's batch, or the
    global batch of ``world`` processes under ``--immiscible_scope global``) within the core's
    ``B^2 * k`` limit, checked here when the trainer's batch size (``train_batch_size``) is known
    before a model loads; elsewhere the first batch's selection checks it."""
    batch = getattr(args, "train_batch_size", None)
    if not settings.enabled or settings.mode != "assign" or type(batch) is not int or batch < 1:
        return
    solved = batch * world if settings.scope == "global" else batch
    entries, limit = solved * solved * settings.k, immiscible.checks.MAX_ASSIGN_COST_ENTRIES
    if entries > limit:
        where = (f"{batch} per process x {world} processes = a global batch of {solved}" if settings.scope == "global"
                 else f"a batch of {solved} per process")
        raise ValueError(f"--immiscible_mode assign with --immiscible_scope {settings.scope}: {where} and "
                         f"--immiscible_k {settings.k} need a {solved} x {solved * settings.k} cost matrix, "
                         f"B^2 x k = {entries}, above the limit {limit} (2^27); use a smaller --immiscible_k, "
                         f"a smaller batch, --immiscible_scope rank or --immiscible_mode knn")


def check_validation(adapter, settings: Settings) -> None:
    """``immiscible_validation`` only where the host has validation passes (a config file can set the
    key where the parser has no such option)."""
    if settings.validation and adapter.host.validation_arg is None:
        raise ValueError(f"immiscible_validation: {adapter.host.name} has no validation passes, so there is no "
                         "validation noise to select; remove the key")


def check_guard(adapter, settings: Settings) -> None:
    """Selection on needs the first-step guard (the table's ``GUARD`` point), because without it a
    drifted run could train on stock noise.

    (The guard's status is recorded when the host module that holds it is imported, which every
    run's start-up comes from; a process that never imported it has nothing to guard.)
    """
    if not settings.enabled:
        return
    status = adapter.runtime.points.get(adapter.guard.name)
    if status is not None and not status.ok:
        raise ValueError(f"immiscible: the first-step guard {adapter.guard.name} is unavailable ({status}), so a run "
                         f"that is not selected could not be stopped; refusing --immiscible_k {settings.k}. "
                         f"{adapter.hint()}")


def current_status(adapter, point: PatchPoint) -> PointStatus | None:
    """The point's status read now, where the patcher's record may be stale or missing: an inline
    point's function source, or a module that was imported without the point's attribute (the hook
    leaves a module without its identifying attribute alone). None keeps the patcher's record."""
    if point.kind == INLINE:
        return inline_status(point)
    module = sys.modules.get(point.module)
    if point.name not in adapter.runtime.points and module is not None and not hasattr(module, point.attribute):
        return broken(f"{point.module} has no {point.attribute} in this {adapter.host.name} version")
    return None


def intercept_inline_draws(adapter, needed: PatchPoint | None) -> None:
    """With selection on: the running trainer's inline draw, and the host's shared loop (if any)."""
    if needed is not None and needed.kind == INLINE:
        intercept_point(needed, adapter.runtime)
    shared = next((p for p in adapter.host.points if p.name == adapter.host.always_intercept), None)
    if shared is not None and shared is not needed and inline_status(shared).ok:
        intercept_point(shared, adapter.runtime)   # an unknown trainer on the shared loop is selected too


def start_up(adapter, args, parser=None) -> Settings:
    """Validate, check the point the running script needs, configure the runtime, log the summary.

    Errors go through ``parser.error`` (exit 2) when a parser is given, else raise ``ValueError``,
    so a bad value stops the run before any model loads. A missing needed point is an error when
    selection is on and a warning (once) when it is off. Idempotent; the summary is logged once per
    settings, on rank 0.
    """
    runtime = adapter.runtime

    def stop(msg, cause=None):
        if parser is not None:
            parser.error(msg)
        raise ValueError(msg) from cause

    try:
        check_near_misses(args)
        settings = settings_from_args(args)
        check_dependencies(settings)
        check_assign_size(settings, args, distributed_rank()[1])
        check_validation(adapter, settings)
        for check in adapter.host.checks:
            check(args, settings)
        check_guard(adapter, settings)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if getattr(args, "config_file", None):
            msg += f" (set in --config_file {args.config_file} or on the command line)"
        stop(msg, exc)
    script = adapter.running_script()
    needed = point_for_script(adapter.host.points, script)
    if needed is not None:
        fresh = current_status(adapter, needed)
        if fresh is not None:
            runtime.points[needed.name] = fresh
        status = runtime.points.get(needed.name)
        problem = "its module was not imported" if status is None else (None if status.ok else str(status))
        if problem is not None:
            msg = f"immiscible: patch point {needed.name} needed by {script} is unavailable: {problem}"
            if settings.enabled:
                stop(f"{msg} {adapter.hint()}")
            runtime.warn_once(f"missing:{needed.name}", "%s (immiscible is off, carrying on)", msg)
    backend = None
    if settings.enabled:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            backend = immiscible.resolve_backend(settings.backend, device)
        except (ImportError, ValueError) as exc:
            stop(f"--immiscible_backend {settings.backend}: {exc}", exc)
        intercept_inline_draws(adapter, needed)
    first = runtime.settings != settings
    runtime.configure(settings, backend, no_metadata=bool(getattr(args, "no_metadata", False)))
    if settings.enabled and first and distributed_rank()[0] == 0:
        logger.info(summary(settings, backend, active_noise_points(adapter.host.points, runtime.points)))
    return settings
