"""Which sd-scripts is this: ``git describe`` and the commit when the tree is a git checkout (the
kohya_ss GUI's ``sd-scripts`` submodule is one), else a fingerprint of ``library/*.py`` matched
against the releases and GUI pins this pack was tested on, else ``"unknown"``.

sd-scripts has no ``__version__`` (its ``setup.py`` installs ``library`` 0.0.0), so this is the
only way to name the version in an error message. Imports nothing heavy.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

from immiscible_host.version import describe_tree
from immiscible_host.version import fingerprint as host_fingerprint

#: sha256 (first 16 hex digits) of library/*.py (names and contents, sorted, LF line ends) -> version.
KNOWN = {
    "e0042d4c758189f7": "v0.8.7 (commit bfb352bc; kohya_ss GUI v24.0.0-v24.1.4)",
    "45340f13135db659": "v0.8.7-114-gb8896aad (kohya_ss GUI v24.1.5-v24.1.7)",
    "e2365faff7b37602": "v0.9.1 (commit 8f4ee8fc)",
    "648aa1e2ee587732": "v0.9.1-457-g8ebe858f (kohya_ss GUI v25.0.x)",
    "b0398ea4d8e28ef8": "v0.9.1-566-g2e0fcc50 (kohya_ss GUI v25.2.2)",
    "a4d34ddf6fc43237": "v0.10.1 (commit ae72efb9)",
    "2c657c1dca4b959b": "v0.10.1-5-g48d368fa (main, 2026-02-16)",
}


def fingerprint(root: Path) -> str | None:
    """The first 16 hex digits of a sha256 over ``root/library/*.py`` (None when unreadable)."""
    return host_fingerprint((p.name, p) for p in sorted((Path(root) / "library").glob("*.py")))


@functools.lru_cache(maxsize=None)
def describe(root: str | Path) -> str:
    """``"v0.9.1-566-g2e0fcc50 (commit 2e0fcc50…)"``, a known fingerprint's name, or ``"unknown"``."""
    root = Path(root)
    return describe_tree(root, fingerprint(root), KNOWN, what="its library files")


def running_root() -> Path | None:
    """The sd-scripts tree whose ``train_util`` this process imported (None if none)."""
    from .points import POINTS

    module = sys.modules.get(POINTS[0].module)  # train_util, the first point's module
    path = getattr(module, "__file__", None)
    return Path(path).resolve().parent.parent if path else None


def running_version() -> str:
    """:func:`describe` of the sd-scripts this process runs, or ``"unknown"``."""
    root = running_root()
    return describe(root) if root is not None else "unknown"
