"""Start-up of a musubi-tuner run: validate the options, refuse architectures whose noise the model
sees transformed, check the noise point the running trainer needs, resolve the backend, log the summary.

Called by the ``read_config_from_file`` wrappers (errors exit with code 2 through the parser) and by
``BlueprintGenerator.generate`` (every trainer builds its dataset there before any model loads); the
machinery is :func:`immiscible_host.startup.start_up`, driven by the table in :mod:`.points`.
"""
from __future__ import annotations

import sys

from immiscible_host import startup
from immiscible_host.inline import inline_status, intercept_point
from immiscible_host.options import Settings
from immiscible_host.points import INLINE

from .options import check_architecture
from .points import BASE_LOOP, GUARD, POINTS
from .runtime import RUNTIME

#: Set by :mod:`musubi_patch.run` when it imports a packaged script by module name.
SCRIPT: str | None = None
#: ``--no_metadata`` of the run (``build_metadata`` gets no args).
STATE = {"no_metadata": False}


def running_script() -> str:
    return SCRIPT or startup.running_script()


def _refresh(point):
    return inline_status(point) if point.kind == INLINE else None


def _on_enabled(point) -> None:
    if point is not None and point.kind == INLINE:
        intercept_point(point, RUNTIME)
    if point is not BASE_LOOP and inline_status(BASE_LOOP).ok:
        intercept_point(BASE_LOOP, RUNTIME)   # an unknown trainer on the shared loop is selected too


check_guard = startup.guard_check(RUNTIME, GUARD, lambda: hint())


def start_up(args, parser=None) -> Settings:
    """Validate, check patch points, configure the run and log the summary (idempotent).

    Errors go through ``parser.error`` (exit 2) when ``parser`` is given, else raise ``ValueError``.
    """
    STATE["no_metadata"] = bool(getattr(args, "no_metadata", False))
    return startup.start_up(RUNTIME, args, POINTS, parser=parser, script=running_script(),
                            extra_checks=(check_architecture, check_guard), point_status=_refresh,
                            on_enabled=_on_enabled, unavailable_hint=hint)


def advice() -> str:
    """What to do when selection cannot be applied (the end of every such error)."""
    from .version import running_root

    root = running_root()
    return (f"Run `python install.py --check --musubi-tuner {root or 'PATH/TO/musubi-tuner'} --python "
            f"{sys.executable}` from the immiscible-diffusion pack and, if it shows nothing BROKEN, open an issue "
            "with its output; or train without --immiscible_k.")


def hint() -> str:
    from .version import running_version

    return f"musubi-tuner version: {running_version()}. {advice()}"
