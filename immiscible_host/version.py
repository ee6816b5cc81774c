"""Naming a host program's version for error messages: ``git describe`` in a git checkout, else a
fingerprint of the files that hold the patch points, matched against the versions a pack was
tested on. Imports nothing heavy.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def git(root: Path, *args: str) -> str | None:
    """``git -C root ARGS`` stdout, or None (not a checkout, no git, an error)."""
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def git_describe(root: Path) -> str | None:
    """``"v0.9.1-566-g2e0fcc50 (commit 2e0fcc50…)"`` in a git checkout, else None."""
    head = git(root, "rev-parse", "HEAD")
    if not head:
        return None
    return f"{git(root, 'describe', '--tags', '--always', '--dirty') or head[:8]} (commit {head})"


def fingerprint(files) -> str | None:
    """The first 16 hex digits of a sha256 over ``(name, path)`` pairs' names and contents (LF line
    ends), None when there are none or one is unreadable."""
    files = list(files)
    if not files:
        return None
    h = hashlib.sha256()
    try:
        for name, path in files:
            h.update(name.encode() + b"\0" + Path(path).read_bytes().replace(b"\r\n", b"\n") + b"\0")
    except OSError:
        return None
    return h.hexdigest()[:16]


def describe_tree(root: Path, fingerprint_of_tree: str | None, known: dict, *, what: str,
                  declared: str | None = None) -> str:
    """A host tree's version: ``git describe`` in a checkout, else ``known[fingerprint]``, else "unknown".

    ``what`` names the fingerprinted files in the message ("its library files"); ``declared`` is a
    version the tree states itself (musubi-tuner's ``pyproject.toml``), shown first when given.
    """
    described = git_describe(root)
    if described:
        return described
    name = known.get(fingerprint_of_tree)
    if declared is None:
        if name:
            return f"{name}, identified by {what} (not a git checkout)"
        return f"unknown (not a git checkout, {what} match no tested version)"
    if name:
        return f"{declared}, identified as {name} by {what} (not a git checkout)"
    return f"{declared} (not a git checkout; {what} match no tested version)"


def pyproject_version(root: Path) -> str | None:
    """The ``version = "..."`` a checkout's ``pyproject.toml`` states, or None."""
    import re

    try:
        text = (Path(root) / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else None
