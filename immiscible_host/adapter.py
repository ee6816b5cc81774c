"""One training program, described once (:class:`Host`), and what the kit keeps for it in a
process (:class:`Adapter`).

An adapter package (``kohya_patch``, ``musubi_patch``, ``onetrainer_patch``) is a :class:`Host`: its table of patch
points, its help text, its start-up rules, where its checkout's files are and which versions it
was tested on. Everything else (the import hook, the patcher, start-up, the first-step guard,
run-time selection, the installer and its ``--check`` report, ``python -m <adapter>.run``) takes
that one description. Importing this module imports nothing heavy: the start-up hook builds an
:class:`Adapter` in every interpreter of the trainer's environment.
"""
from __future__ import annotations

import collections
import functools
import os
import sys
from pathlib import Path

from .hook import ImportHook
from .points import GUARD, hook_targets, point_of_kind


_HOST_FIELDS = ("name", "package", "short", "points", "k_help", "install_flag", "disable_env", "dump_env",
                "checkout_file", "root_module", "trainer_globs", "version_files", "known_versions", "validation_arg",
                "checks", "source_dir", "pyproject_version", "not_in_version", "always_intercept", "unknown_trainer",
                "notes", "config_keys", "stock_arg", "loss_tags", "ui_fields")
_HOST_DEFAULTS = ({}, None, (), "", False, {}, None,
                  "not a trainer this pack knows: with --immiscible_k > 1 it stops at its first step unless its noise "
                  "goes through a patch point above",
                  None, (), None, (), ())


class Host(collections.namedtuple("Host", _HOST_FIELDS, defaults=_HOST_DEFAULTS)):
    """What the kit needs to know about one training program.

    Parameters
    ----------
    name : str
        The program's name in messages (``"sd-scripts"``).
    package : str
        The adapter package; its ``startup`` module is what the installed ``.pth`` line imports.
    short : str
        The tag in the installer's file names (``"kohya"`` -> ``immiscible_kohya_startup.pth``).
    points : tuple of PatchPoint
        The table: every role (options, config file, start-up, metadata, trackers, guard, noise)
        is a row's ``kind``.
    k_help : str
        ``--immiscible_k``'s help: the program's model families and recommended values.
    install_flag : str
        ``install.py``'s option for this program (``"--sd-scripts"``).
    disable_env, dump_env : str
        Environment variables: keep the hook out; a folder for per-selection JSON lines.
    validation_arg : str or None
        The trainer's argument that is False in validation passes (sd-scripts: ``is_train``);
        None: the program has no validation passes (and no ``--immiscible_validation``).
    checks : tuple of callables ``(args, settings)``
        The program's own start-up rules; each raises ``ValueError`` naming the options.
    checkout_file : str
        A file, relative to a checkout's root, that only this program's checkouts have.
    source_dir : str
        Where the points' module files live, relative to the root (``""`` or ``"src"``).
    root_module : (str, int)
        A module whose ``__file__`` locates the running checkout, and how many folders up its root is.
    trainer_globs : tuple of str
        The trainer scripts of a checkout, relative to its root.
    version_files : (str, tuple of str)
        A folder (relative to the root) and the globs in it whose names and contents make a
        checkout's fingerprint.
    known_versions : dict
        Fingerprint -> the tested version it identifies.
    pyproject_version : bool
        The checkout's ``pyproject.toml`` states a version worth showing.
    not_in_version : dict
        Fingerprint -> {point name: why that version ships the file but not the point}.
    always_intercept : str or None
        An inline point intercepted whenever selection is on (a shared training loop that unknown
        trainers built on it use too).
    unknown_trainer : str
        What ``--check`` says of a shipped trainer the table does not name.
    notes : callable ``root -> list[str]``, optional
        More ``--check`` lines about a checkout (e.g. a noise selection of the program's own).
    config_keys : tuple of str
        A program configured by a typed config object (OneTrainer): the options it declares as
        fields (``SCHEMA`` and ``RAW_CONFIG`` points).
    stock_arg : str or None
        The caller's argument that is True where the noise must stay stock (OneTrainer's
        ``predict(..., deterministic=True)`` in validation), read by ``GENERATOR_NOISE`` points.
    loss_tags : tuple of str
        The scalar tags of the program's per-step loss, beside which ``SCALARS`` points log
        ``immiscible/reduction``.
    ui_fields : tuple of ``(key, label, tooltip)``
        The widgets a ``UI_FRAME`` point adds: a drop-down for an option with choices
        (:data:`immiscible_host.typed_config.CHOICES`), else an entry.

    (Immutable; a named tuple rather than a dataclass, so that building it at interpreter start-up
    imports nothing more.)
    """

    __slots__ = ()
    #: Hashable by identity (its dict fields are not hashable), so a host can key a cache.
    __hash__ = object.__hash__

    @property
    def pth_name(self) -> str:
        return f"immiscible_{self.short}_startup.pth"

    @property
    def marker_name(self) -> str:
        return f"immiscible_{self.short}_install.json"

    @property
    def marker_key(self) -> str:
        """The key under which the installer's marker records the checkout (``"sd_scripts"``)."""
        return self.install_flag.lstrip("-").replace("-", "_")

    def is_checkout(self, root: Path | None) -> bool:
        return root is not None and (Path(root) / self.checkout_file).exists()

    def fingerprint(self, root: Path) -> str | None:
        """The first 16 hex digits of a sha256 over :attr:`version_files` under ``root`` (None if unreadable)."""
        from .version import fingerprint

        folder, globs = self.version_files
        base = Path(root) / folder
        files = [(p.relative_to(base).as_posix(), p) for g in globs for p in sorted(base.glob(g))]
        return fingerprint(files)

    def describe(self, root: Path) -> str:
        """``git describe`` and the commit, a tested version recognised by its files, or ``unknown``."""
        return _describe(self, str(Path(root)))


@functools.lru_cache(maxsize=None)
def _describe(host: Host, root: str) -> str:
    from . import version  # runs git: only when a message names the version

    declared = None
    if host.pyproject_version:
        declared = version.pyproject_version(Path(root)) or "no pyproject version"
    what = f"its {host.version_files[0].rsplit('/', 1)[-1]} files" if not host.pyproject_version else "its patched files"
    return version.describe_tree(Path(root), host.fingerprint(Path(root)), host.known_versions, what=what,
                                 declared=declared)


def running_script() -> str:
    """Base name of the script this process runs (``"train_network.py"``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    return os.path.basename(path or "")


def console_logging() -> None:
    """In a program that configures no logging (OneTrainer), the kit's start-up line and warnings still
    reach the console: the ``immiscible_host`` logger gets its own stderr handler at INFO. A program
    with a root handler (sd-scripts, musubi-tuner) is left as it is."""
    import logging

    log = logging.getLogger(__package__)
    if logging.getLogger().handlers or log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False   # a root handler the program adds later would print every line twice


class Adapter:
    """A :class:`Host` in this process: its import hook, its run-time state, where it runs."""

    def __init__(self, host: Host):
        self.host = host
        #: The point whose first call checks the run's first draw (the table's one ``GUARD`` row).
        self.guard = point_of_kind(host.points, GUARD)
        self.hook = ImportHook(host.package, hook_targets(host.points), self.patch, disable_env=host.disable_env)
        #: Set by ``python -m <adapter>.run`` when it imports a packaged script by module name.
        self.script: str | None = None
        self._runtime = None

    @property
    def runtime(self):
        """The :class:`~immiscible_host.runtime.Runtime` (made on first use: it imports torch)."""
        if self._runtime is None:
            from .runtime import Runtime

            self._runtime = Runtime(dump_env=self.host.dump_env, validation_arg=self.host.validation_arg)
        return self._runtime

    def patch(self, module) -> None:
        """The hook's callback: wrap every point ``module``'s import triggers."""
        from .wrappers import patch_module  # heavy from here on: the wrappers import torch

        patch_module(module, self)

    def start_up(self, args, parser=None):
        """Validate, check the running trainer's point, configure the run, log the summary."""
        from .preflight import start_up

        console_logging()
        return start_up(self, args, parser)

    # ------------------------------------------------------------------ where it runs

    def running_script(self) -> str:
        return self.script or running_script()

    def running_root(self) -> Path | None:
        """The checkout whose module this process imported (None if none)."""
        module_name, up = self.host.root_module
        path = getattr(sys.modules.get(module_name), "__file__", None)
        if not path:
            return None
        root = Path(path).resolve()
        for _ in range(up):
            root = root.parent
        return root

    def running_version(self) -> str:
        root = self.running_root()
        return self.host.describe(root) if root is not None else "unknown"

    def advice(self) -> str:
        """What to do when selection cannot be applied (the end of every such error)."""
        root = self.running_root()
        return (f"Run `python install.py --check {self.host.install_flag} {root or 'PATH/TO/' + self.host.name} "
                f"--python {sys.executable}` from the immiscible-diffusion pack and, if it shows nothing BROKEN, "
                "open an issue with its output; or train without --immiscible_k.")

    def hint(self) -> str:
        return f"({self.host.name} version: {self.running_version()}). {self.advice()}"
