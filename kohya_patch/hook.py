"""Import hook: patch sd-scripts' ``library`` modules right after they are imported.

Installed at interpreter start-up by the ``.pth`` file that ``install.py --sd-scripts`` writes,
or by ``python -m kohya_patch.run``. It imports nothing heavy and does nothing unless one of
``TARGETS`` is imported, so unrelated programs in the same environment are unaffected.
Set ``IMMISCIBLE_KOHYA_DISABLE=1`` to turn it off.
"""
from __future__ import annotations

import importlib.abc
import logging
import os
import sys

logger = logging.getLogger(__name__)

DISABLE_ENV = "IMMISCIBLE_KOHYA_DISABLE"
#: Module -> an attribute only sd-scripts' version of it has (checked before anything heavy is imported).
TARGETS = {
    "library.train_util": "add_training_arguments",
    "library.flux_train_utils": "get_noisy_model_input_and_timesteps",
    "library.sd3_train_utils": "get_noisy_model_input_and_timesteps",
    "library.lumina_train_util": "get_noisy_model_input_and_timesteps",
}


def _patch(module) -> None:
    if not hasattr(module, TARGETS.get(getattr(module, "__name__", ""), "\0")):
        return  # some other project's `library` package: leave it alone
    try:
        from . import patches

        patches.patch_module(module)
    except Exception:  # noqa: BLE001 - never break the import of sd-scripts itself
        logger.warning("immiscible: patching %s failed; sd-scripts runs unpatched",
                       getattr(module, "__name__", module), exc_info=True)


class PatchFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders, then wraps the loader's ``exec_module``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TARGETS:
            return None
        try:
            return self._find(fullname, path, target)
        except Exception:  # noqa: BLE001 - fall back to the normal import
            return None

    def _find(self, fullname, path, target):
        spec = None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, PatchFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or getattr(exec_module, "__immiscible_patched__", False):
            return spec

        def patched_exec_module(module):
            exec_module(module)
            _patch(module)

        patched_exec_module.__immiscible_patched__ = True
        loader.exec_module = patched_exec_module  # a per-spec loader instance
        return spec


def installed() -> bool:
    return any(isinstance(f, PatchFinder) for f in sys.meta_path)


def install() -> bool:
    """Put the finder first on ``sys.meta_path`` and patch targets already imported. Idempotent."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    if not installed():
        sys.meta_path.insert(0, PatchFinder())
    for name in TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            _patch(module)
    return True


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PatchFinder)]
