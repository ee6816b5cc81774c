"""Inline draws: a host function that writes ``noise = torch.randn_like(latents)`` in its own body.

:func:`inline_status` reads such a function's source (the host's module, or ``__main__`` when the
script runs as a file) and checks it against its :class:`~immiscible_host.points.PatchPoint`;
:func:`intercept_point` makes that function's direct ``torch.randn_like`` calls return the
selection (:func:`immiscible_host.randn_like.intercept_in_function`). Attributes may be dotted
(``"NetworkTrainer._run_training_loop"``), so a method of a class works as well as a function.
"""
from __future__ import annotations

import inspect
import sys

from .points import PatchPoint, PointStatus, broken, check_source


def find_attribute(point: PatchPoint):
    """The host's object for ``point`` (any of its module names, else ``__main__``), or None."""
    candidates = [sys.modules[m] for m in point.modules if m in sys.modules]
    main = sys.modules.get("__main__")
    if main is not None and point.files and getattr(main, "__file__", "").replace("\\", "/").endswith(
            tuple(f.rsplit("/", 1)[-1] for f in point.files)):
        candidates.append(main)
    for obj in candidates:
        for part in point.attribute.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    return None


def inline_status(point: PatchPoint) -> PointStatus:
    """Does the function still draw its noise inline (``point.needle`` in its source)?"""
    fn = find_attribute(point)
    if fn is None:
        return broken(f"{point.module}.{point.attribute} not found (module not imported or attribute gone)")
    try:
        source = inspect.getsource(fn)
    except Exception as exc:  # noqa: BLE001
        return broken(f"cannot read {point.module}.{point.attribute} ({type(exc).__name__})")
    return check_source(point, (), source)


def intercept_point(point: PatchPoint, runtime) -> None:
    """From now on, ``torch.randn_like(x)`` called directly in ``point``'s function returns the selection."""
    from .randn_like import intercept_in_function  # imports torch

    files = tuple(f.rsplit("/", 1)[-1] for f in point.files)
    intercept_in_function(files, point.attribute.rsplit(".", 1)[-1], point.name, runtime)
