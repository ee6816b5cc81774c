"""Install, check and remove the ComfyUI pack (``python install.py --comfyui PATH ...``).

* ``--comfyui PATH``: link (or with ``copy`` copy) this pack into ``PATH/custom_nodes/immiscible_diffusion``
  and make sure ``requirements.txt`` is satisfied in ComfyUI's python (``--python``, else
  ``PATH/venv``, ``PATH/.venv``, ``PATH/../python_embeded``, else the running python).
* no ``--comfyui`` (ComfyUI-Manager runs ``install.py`` inside the cloned pack): requirements only.
* ``check``: report, change nothing; ``uninstall``: remove the link or the copy this installer made
  (requirements stay: other packs may use them).

Every step is idempotent. Nothing outside ``PATH/custom_nodes/immiscible_diffusion`` is touched,
except that pip installs missing requirements.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
REQUIREMENTS = PACK_DIR / "requirements.txt"
#: Folder name inside custom_nodes. Never "immiscible": ComfyUI registers a pack under its folder
#: name, which would shadow the core ``immiscible`` package.
LINK_NAME = "immiscible_diffusion"
MARKER = ".immiscible-comfyui-copy"
_COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".hypothesis",
                                      "*.pyc", ".ruff_cache")


def _log(msg: str) -> None:
    print(f"[immiscible comfyui] {msg}")


def requirement_names(path: Path = REQUIREMENTS) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0])
    return names


def find_python(comfyui: Path | None, python: str | None) -> str:
    if python:
        return python
    if comfyui is not None:
        for cand in (comfyui / "venv/bin/python", comfyui / ".venv/bin/python", comfyui / "venv/Scripts/python.exe",
                     comfyui / ".venv/Scripts/python.exe", comfyui.parent / "python_embeded/python.exe"):
            if cand.exists():
                return str(cand)
        _log(f"no venv found in {comfyui}; using {sys.executable} (pass --python to choose ComfyUI's python)")
    return sys.executable


def missing_requirements(python: str) -> list[str]:
    """Requirements whose distribution is not installed in ``python``'s environment."""
    code = ("import sys, importlib.metadata as m\n"
            "for n in sys.argv[1:]:\n"
            "    try: m.version(n)\n"
            "    except m.PackageNotFoundError: print(n)\n")
    out = subprocess.run([python, "-c", code, *requirement_names()], capture_output=True, text=True, check=True)
    return out.stdout.split()


def ensure_requirements(python: str, check: bool = False) -> int:
    try:
        missing = missing_requirements(python)
    except (OSError, subprocess.CalledProcessError) as exc:
        _log(f"cannot run {python}: {exc}")
        return 1
    if not missing:
        _log(f"requirements satisfied in {python}")
        return 0
    if check:
        _log(f"missing in {python}: {' '.join(missing)} (run: {python} -m pip install -r {REQUIREMENTS})")
        return 1
    _log(f"installing {' '.join(missing)} into {python}")
    return subprocess.run([python, "-m", "pip", "install", "-r", str(REQUIREMENTS)]).returncode


def _ours(target: Path) -> bool:
    if target.is_symlink():
        return Path(os.path.realpath(target)) == PACK_DIR
    return target.is_dir() and (target / MARKER).exists()


def _remove(target: Path) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)


def install_pack(custom_nodes: Path, copy: bool) -> int:
    target = custom_nodes / LINK_NAME
    if target.exists() or target.is_symlink():
        if not _ours(target):
            _log(f"{target} exists and was not made by this installer; remove it first")
            return 1
        if target.is_symlink() and not copy:
            _log(f"already linked: {target} -> {PACK_DIR}")
            return 0
        _remove(target)
    if copy:
        shutil.copytree(PACK_DIR, target, ignore=_COPY_IGNORE)
        (target / MARKER).write_text(f"copied from {PACK_DIR}\n")
        _log(f"copied {PACK_DIR} -> {target}")
    else:
        target.symlink_to(PACK_DIR, target_is_directory=True)
        _log(f"linked {target} -> {PACK_DIR}")
    return 0


def main(comfyui=None, python=None, copy=False, check=False, uninstall=False) -> int:
    root = Path(comfyui).expanduser().resolve() if comfyui else None
    if root is None:
        if uninstall:
            _log("nothing to uninstall without --comfyui PATH (requirements are left in place)")
            return 0
        return ensure_requirements(find_python(None, python), check=check)
    custom_nodes = root / "custom_nodes"
    if not (root / "main.py").exists() or not custom_nodes.is_dir():
        _log(f"{root} does not look like ComfyUI (needs main.py and custom_nodes/)")
        return 1
    target = custom_nodes / LINK_NAME
    if uninstall:
        if not (target.exists() or target.is_symlink()):
            _log(f"not installed in {custom_nodes}")
            return 0
        if not _ours(target):
            _log(f"{target} was not made by this installer; leaving it")
            return 1
        _remove(target)
        _log(f"removed {target}")
        return 0
    if check:
        installed = _ours(target)
        _log(f"{target}: {'installed' if installed else 'not installed'}"
             + (f" ({'link' if target.is_symlink() else 'copy'})" if installed else ""))
        return ensure_requirements(find_python(root, python), check=True) | (0 if installed else 1)
    rc = install_pack(custom_nodes, copy)
    return rc | ensure_requirements(find_python(root, python))
