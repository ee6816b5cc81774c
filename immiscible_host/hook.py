"""An import hook that patches a host program's modules right after they are imported.

:class:`ImportHook` is a meta-path finder parametrised by a table of target modules (module name ->
an attribute only the host's version of that module has, see
:func:`immiscible_host.points.hook_targets`). It finds nothing itself: it asks the other finders
and wraps the loader's ``exec_module`` so that ``patch(module)`` runs once the module is loaded.
A module without the identifying attribute (another project's ``library`` package) is left alone,
and a ``patch`` that raises is logged and swallowed, so the host always imports.

It imports nothing heavy, so an adapter can install it at interpreter start-up: not even
``importlib.abc`` or ``logging`` (a finder only needs ``find_spec``; a failure is logged lazily),
since every interpreter of the trainer's environment pays for what this module imports.
"""
from __future__ import annotations

import os
import sys

MARK = "__immiscible_patched__"


def has_attribute(obj, dotted: str) -> bool:
    """Whether ``obj`` has the (possibly dotted: ``"Class.method"``) attribute."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return True


class ImportHook:
    """Calls ``patch(module)`` after any module in ``targets`` is imported.

    Parameters
    ----------
    name : str
        The adapter's name; one hook per name is installed.
    targets : dict[str, str]
        Module name -> the attribute that identifies it as the host's own.
    patch : callable(module)
        Applies the adapter's patches; may import heavy modules (torch), since the host does.
    disable_env : str, optional
        An environment variable that, set to anything but ``""``/``"0"``, keeps the hook out.
    """

    def __init__(self, name: str, targets: dict[str, str], patch, disable_env: str | None = None):
        self.name, self.targets, self.patch, self.disable_env = name, dict(targets), patch, disable_env

    # ------------------------------------------------------------------ patching

    def patch_loaded(self, module) -> None:
        """Patch ``module`` if it is a target and the host's own; never raises."""
        name = getattr(module, "__name__", "")
        if name not in self.targets or not has_attribute(module, self.targets[name]):
            return  # some other project's module of the same name: leave it alone
        try:
            self.patch(module)
        except Exception:  # noqa: BLE001 - never break the import of the host itself
            import logging

            logging.getLogger(__name__).warning("immiscible: patching %s failed; it runs unpatched", name,
                                                exc_info=True)

    # ------------------------------------------------------------------ finder

    def invalidate_caches(self) -> None:
        """What ``importlib.invalidate_caches`` asks of every finder (ours has no cache)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.targets:
            return None
        try:
            return self._find(fullname, path, target)
        except Exception:  # noqa: BLE001 - fall back to the normal import
            return None

    def _find(self, fullname, path, target):
        spec = None
        for finder in sys.meta_path:
            if isinstance(finder, ImportHook):
                continue  # ours never find anything themselves
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or getattr(exec_module, MARK, False):
            return spec

        def patched_exec_module(module):
            exec_module(module)
            self.patch_loaded(module)

        setattr(patched_exec_module, MARK, True)
        loader.exec_module = patched_exec_module  # a per-spec loader instance
        return spec

    # ------------------------------------------------------------------ install

    def _mine(self, finder) -> bool:
        return isinstance(finder, ImportHook) and finder.name == self.name

    def installed(self) -> bool:
        return any(self._mine(f) for f in sys.meta_path)

    def disabled(self) -> bool:
        return bool(self.disable_env) and os.environ.get(self.disable_env, "") not in ("", "0")

    def install(self) -> bool:
        """Put the hook first on ``sys.meta_path`` and patch targets already imported. Idempotent.

        Returns False (and installs nothing) when ``disable_env`` is set.
        """
        if self.disabled():
            return False
        if not self.installed():
            sys.meta_path.insert(0, self)
        for name in self.targets:
            module = sys.modules.get(name)
            if module is not None:
                self.patch_loaded(module)
        return True

    def uninstall(self) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if not self._mine(f)]
