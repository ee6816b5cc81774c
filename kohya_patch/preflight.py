"""Start-up of an sd-scripts run: validate the options, check the noise point the running
trainer needs, resolve the backend and log the one-line summary.

Called by the ``read_config_from_file`` and ``verify_training_args`` wrappers (:mod:`.support`);
the machinery is :func:`immiscible_host.startup.start_up`, driven by the table in :mod:`.points`.
"""
from __future__ import annotations

import sys

from immiscible_host import startup
from immiscible_host.options import Settings
from immiscible_host.points import INLINE, broken
from immiscible_host.startup import running_script

from .noise import inline_status, intercept_inline
from .options import check_upstream_overlap
from .points import POINTS
from .runtime import RUNTIME

#: The patch point whose first call checks that the run's first draw was selected.
GUARD = next(p.name for p in POINTS if p.wrapper and p.wrapper.endswith(":wrap_backward"))


def _refresh(point):
    if point.kind == INLINE:
        return inline_status(point)
    module = sys.modules.get(point.module)
    if point.name not in RUNTIME.points and module is not None and not hasattr(module, point.attribute):
        # the hook leaves a module without its identifying attribute alone (e.g. b8896aad's sd3_train_utils)
        return broken(f"{point.module} has no {point.attribute} in this sd-scripts version")
    return None


def _on_enabled(point) -> None:
    if point is not None and point.kind == INLINE:
        intercept_inline(point)


check_guard = startup.guard_check(RUNTIME, GUARD, lambda: _hint())


def start_up(args, parser=None) -> Settings:
    """Validate, check patch points, configure the run and log the summary (idempotent).

    Errors go through ``parser.error`` (exit 2) when ``parser`` is given, else raise ``ValueError``.
    """
    return startup.start_up(RUNTIME, args, POINTS, parser=parser, script=running_script(),
                            extra_checks=(check_upstream_overlap, check_guard), point_status=_refresh, on_enabled=_on_enabled,
                            unavailable_hint=_hint)


def _hint() -> str:
    from .support import advice
    from .version import running_version

    return f"(sd-scripts version: {running_version()}). {advice()}"
