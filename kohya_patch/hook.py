"""The sd-scripts start-up hook: patch sd-scripts' ``library`` modules right after they are imported.

Installed at interpreter start-up by the ``.pth`` file that ``install.py --sd-scripts`` writes
(through :mod:`kohya_patch.startup`), or by ``python -m kohya_patch.run``. It imports nothing
heavy and does nothing unless one of :data:`TARGETS` (derived from :mod:`.points`) is imported,
so unrelated programs in the same environment are unaffected. Set ``IMMISCIBLE_KOHYA_DISABLE=1``
to turn it off.
"""
from __future__ import annotations

from immiscible_host.hook import ImportHook

from .points import HOOK_TARGETS

DISABLE_ENV = "IMMISCIBLE_KOHYA_DISABLE"
#: Module -> an attribute only sd-scripts' version of it has (checked before anything heavy is imported).
TARGETS = HOOK_TARGETS


def _patch(module) -> None:
    from immiscible_host.patching import patch_module  # heavy from here on: the wrappers import torch

    from .points import POINTS
    from .runtime import RUNTIME

    patch_module(module, POINTS, RUNTIME.points)


HOOK = ImportHook("kohya_patch", TARGETS, _patch, disable_env=DISABLE_ENV)


def installed() -> bool:
    return HOOK.installed()


def install() -> bool:
    """Put the hook first on ``sys.meta_path`` and patch targets already imported. Idempotent.

    Returns False when ``IMMISCIBLE_KOHYA_DISABLE`` is set.
    """
    return HOOK.install()


def uninstall() -> None:
    HOOK.uninstall()
