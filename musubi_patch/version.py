"""Which musubi-tuner is this: ``git describe`` and the commit when the tree is a git checkout, else
``pyproject.toml``'s version plus a fingerprint of the files this pack patches, matched against the
versions it was tested on. Imports nothing heavy.
"""
from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

from immiscible_host.version import describe_tree
from immiscible_host.version import fingerprint as host_fingerprint

#: sha256 (first 16 hex digits) of the patched source files (see :data:`FILES`) -> version.
KNOWN = {
    "fe14544d8b9c4f59": "v0.3.4 (commit 30c658c4, main 2026-06-24)",
}
#: The files under ``src/musubi_tuner`` that hold patch points (the fingerprint's input).
FILES = ("training/trainer_base.py", "training/parser_common.py", "utils/sai_model_spec.py",
         "dataset/config_utils.py", "hv_train.py", "qwen_image_train.py", "zimage_train.py", "hidream_o1_train.py")


def fingerprint(root: Path) -> str | None:
    """First 16 hex digits of a sha256 over :data:`FILES` under ``root/src/musubi_tuner`` (None if unreadable)."""
    return host_fingerprint((rel, Path(root) / "src/musubi_tuner" / rel) for rel in FILES)


def pyproject_version(root: Path) -> str | None:
    try:
        text = (Path(root) / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else None


@functools.lru_cache(maxsize=None)
def describe(root: str | Path) -> str:
    """``"v0.3.4-2-gabcdef12 (commit …)"``, ``"0.3.4, identified as v0.3.4 (commit 30c658c4 …)"`` or ``"unknown"``."""
    root = Path(root)
    return describe_tree(root, fingerprint(root), KNOWN, what="its patched files",
                         declared=pyproject_version(root) or "no pyproject version")


def running_root() -> Path | None:
    """The musubi-tuner checkout whose package this process imported (None if none)."""
    module = sys.modules.get("musubi_tuner")
    path = getattr(module, "__file__", None)
    return Path(path).resolve().parent.parent.parent if path else None   # src/musubi_tuner/__init__.py


def running_version() -> str:
    root = running_root()
    return describe(root) if root is not None else "unknown"
