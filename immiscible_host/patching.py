"""Apply a table of patch points to a loaded module, recording each point's status.

``wrap(point, original)`` builds each wrapper (:func:`immiscible_host.wrappers.patch_module` passes
the factory of the point's kind); the patcher only finds the attribute, checks it against the table
(parameters, source needle), wraps it once and records ``ok`` or ``broken (why)``. Nothing here
raises into the host.
"""
from __future__ import annotations

import importlib
import inspect
import logging

from .hook import MARK
from .points import PatchPoint, PointStatus, broken, check_source, ok, points_patched_with

logger = logging.getLogger(__name__)


def mark(wrapper, original):
    """Tag ``wrapper`` as ours and keep ``original`` as its ``__wrapped__``."""
    setattr(wrapper, MARK, True)
    wrapper.__wrapped__ = original
    return wrapper


def is_patched(fn) -> bool:
    return bool(getattr(fn, MARK, False))


def check_callable(point: PatchPoint, fn) -> PointStatus:
    """``fn`` (the unwrapped original) against the point's parameters and source needle."""
    if not point.params and not point.needle:
        return ok()
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    source = None
    if point.needle:
        try:
            source = inspect.getsource(fn)
        except Exception as exc:  # noqa: BLE001
            return broken(f"source unreadable ({type(exc).__name__})")
    return check_source(point, params, source)


def patch_point(point: PatchPoint, module, wrap) -> PointStatus:
    """Wrap ``point`` in ``module`` with ``wrap(point, original)`` (idempotent)."""
    *path, attr = point.attribute.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part, None)
    fn = getattr(owner, attr, None) if owner is not None else None
    if fn is None:
        return broken(f"{point.module}.{point.attribute} not found")
    if is_patched(fn):
        return ok()
    status = check_callable(point, fn)
    if not status.ok:
        return status
    wrapped = wrap(point, fn)
    if isinstance(inspect.getattr_static(owner, attr, None), staticmethod):
        wrapped = staticmethod(wrapped)   # stays callable on instances as it was
    setattr(owner, attr, wrapped)
    return ok()


def patch_module(module, points, statuses: dict[str, PointStatus], wrap) -> None:
    """Patch every point that ``module``'s import triggers with ``wrap(point, original)``; record
    each in ``statuses``. Never raises."""
    name = getattr(module, "__name__", "")
    for point in points_patched_with(points, name):
        try:
            if point.module == name:
                target = module
            else:
                try:
                    target = importlib.import_module(point.module)  # a host module the table names
                except Exception as exc:  # noqa: BLE001
                    statuses[point.name] = broken(f"{point.module} not importable ({type(exc).__name__})")
                    continue
            statuses[point.name] = patch_point(point, target, wrap)
        except Exception as exc:  # noqa: BLE001 - a patch that fails must leave the host working
            statuses[point.name] = broken(f"patching failed ({type(exc).__name__}: {exc})")
            logger.warning("immiscible: could not patch %s", point.name, exc_info=True)
