"""The musubi-tuner start-up hook: patch musubi-tuner's modules right after they are imported.

Installed at interpreter start-up by the ``.pth`` file that ``install.py --musubi-tuner`` writes
(through :mod:`musubi_patch.startup`), or by ``python -m musubi_patch.run``. It imports nothing
heavy and does nothing unless one of :data:`TARGETS` (derived from :mod:`.points`) is imported, so
unrelated programs in the same environment are unaffected. ``IMMISCIBLE_MUSUBI_DISABLE=1`` turns it off.
"""
from __future__ import annotations

from immiscible_host.hook import ImportHook

from .points import HOOK_TARGETS

DISABLE_ENV = "IMMISCIBLE_MUSUBI_DISABLE"
TARGETS = HOOK_TARGETS


def _patch(module) -> None:
    from immiscible_host.patching import patch_module  # heavy from here on: the wrappers import torch

    from .points import POINTS
    from .runtime import RUNTIME

    patch_module(module, POINTS, RUNTIME.points)


HOOK = ImportHook("musubi_patch", TARGETS, _patch, disable_env=DISABLE_ENV)


def installed() -> bool:
    return HOOK.installed()


def install() -> bool:
    """Put the hook first on ``sys.meta_path`` and patch targets already imported (idempotent)."""
    return HOOK.install()


def uninstall() -> None:
    HOOK.uninstall()
