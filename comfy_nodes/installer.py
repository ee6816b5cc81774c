"""Install, check and remove the ComfyUI pack (``python install.py --comfyui PATH ...``).

* ``--comfyui PATH``: link (or with ``copy`` copy) this pack into ``PATH/custom_nodes/immiscible_diffusion``
  and make sure ``requirements.txt`` is satisfied in ComfyUI's python (``--python``, else
  ``PATH/venv``, ``PATH/.venv``, ``PATH/../python_embeded``, else the running python).
* no ``--comfyui`` (ComfyUI-Manager runs ``install.py`` inside the cloned pack): requirements only.
* ``check``: report, change nothing; ``uninstall``: remove the link or the copy this installer made
  (requirements stay: other packs may use them).

Every step is idempotent. Nothing outside ``PATH/custom_nodes/immiscible_diffusion`` is touched,
except that pip installs missing requirements. An install that fails (a python that does not run,
pip failing, an interrupt) leaves custom_nodes as it found it: the copy is staged and renamed into
place, a link and the copy's marker are written through a temporary name and ``os.replace``, and a
replaced install is kept aside until the requirements are in. ``check`` reports a damaged marker
(naming the file) and what a killed run left; install and uninstall recover from both.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .train_support import checkout_support, checkout_version

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
    """A link to this checkout, or a folder holding this installer's marker (even a damaged one)."""
    if target.is_symlink():
        return Path(os.path.realpath(target)) == PACK_DIR
    return target.is_dir() and os.path.lexists(target / MARKER)


def marker_problem(marker: Path) -> str | None:
    """What is wrong with a copy's marker file (None when it reads ``copied from PATH``)."""
    try:
        text = marker.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return "corrupt (not text)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not text.strip():
        return "empty"
    if not text.startswith("copied from "):
        return f"corrupt (expected 'copied from PATH', found {text[:40]!r})"
    return None


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and ``os.replace``: it is whole or absent, never partial."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def _link_atomic(target: Path, source: Path) -> None:
    """Make ``target`` a link to ``source`` through a temporary link and ``os.replace``."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.symlink_to(source, target_is_directory=True)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def _remove(target: Path) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)


#: Names this installer gives what it stages or moves aside in custom_nodes while it works. ComfyUI
#: skips entries ending in ``.disabled``, so a leftover of a killed run is never loaded.
_ASIDE = re.compile(rf"^\.{re.escape(LINK_NAME)}\.(new|old)-(\d+)\.disabled$")


def _aside(custom_nodes: Path, kind: str) -> Path:
    return custom_nodes / f".{LINK_NAME}.{kind}-{os.getpid()}.disabled"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def leftovers(custom_nodes: Path) -> list[Path]:
    """What a run of this installer that was killed left in ``custom_nodes`` (its process is gone)."""
    found = []
    for entry in sorted(custom_nodes.iterdir()) if custom_nodes.is_dir() else []:
        m = _ASIDE.match(entry.name)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            found.append(entry)
    return found


def _recover(custom_nodes: Path) -> None:
    """Finish what a killed run left: put a moved-aside install back where none is, drop the rest."""
    target = custom_nodes / LINK_NAME
    for entry in leftovers(custom_nodes):
        if _ASIDE.match(entry.name).group(1) == "old" and not os.path.lexists(target):
            os.rename(entry, target)
            _log(f"restored {target} from {entry.name}, left by an interrupted run")
        else:
            _remove(entry)
            _log(f"removed {entry}, left by an interrupted run")


class Change:
    """What :func:`install_pack` did in custom_nodes, kept until the whole install succeeded.

    :meth:`undo` puts back what was there before (nothing, the previous link or the previous copy);
    :meth:`commit` drops the previous install. Both are idempotent.
    """

    def __init__(self, target: Path, made: bool = False, old: Path | None = None):
        self.target, self.made, self.old = target, made, old

    def undo(self) -> None:
        if not (self.made or self.old):
            return
        if self.made:
            _remove(self.target)
            self.made = False
        if self.old is not None:
            os.rename(self.old, self.target)
            self.old = None
            _log(f"rolled back: {self.target} is the install it replaced again")
        else:
            _log(f"rolled back: removed {self.target}")

    def commit(self) -> None:
        if self.old is not None:
            _remove(self.old)
            self.old = None
        self.made = False


def install_pack(custom_nodes: Path, copy: bool) -> tuple[int, Change | None]:
    """Link or copy the pack into ``custom_nodes``; returns ``(rc, the change to commit or undo)``.

    The copy is staged under a ``.disabled`` name with its marker, then renamed into place; a
    previous install of ours is moved aside until :meth:`Change.commit`. A failure midway leaves
    custom_nodes as it was.
    """
    target = custom_nodes / LINK_NAME
    _recover(custom_nodes)
    if os.path.lexists(target):
        if not _ours(target):
            _log(f"{target} exists and was not made by this installer; remove it first")
            return 1, None
        if target.is_symlink() and not copy:
            _log(f"already linked: {target} -> {PACK_DIR}")
            return 0, Change(target)
        if not target.is_symlink() and (problem := marker_problem(target / MARKER)):
            _log(f"{target / MARKER} is {problem}; replacing the copy")
    change = Change(target)
    stage = _aside(custom_nodes, "new")
    try:
        if copy:
            shutil.copytree(PACK_DIR, stage, ignore=_COPY_IGNORE)
            _write_atomic(stage / MARKER, f"copied from {PACK_DIR}\n")
        if os.path.lexists(target):
            change.old = _aside(custom_nodes, "old")
            os.rename(target, change.old)
        if copy:
            os.rename(stage, target)
        else:
            _link_atomic(target, PACK_DIR)
        change.made = True
    except BaseException:
        if os.path.lexists(stage):
            _remove(stage)
        change.undo()
        raise
    _log(f"copied {PACK_DIR} -> {target}" if copy else f"linked {target} -> {PACK_DIR}")
    return 0, change


def uninstall_pack(custom_nodes: Path) -> int:
    target = custom_nodes / LINK_NAME
    _recover(custom_nodes)
    if not os.path.lexists(target):
        _log(f"not installed in {custom_nodes}")
        return 0
    if not _ours(target):
        _log(f"{target} was not made by this installer; leaving it")
        return 1
    if not target.is_symlink() and (problem := marker_problem(target / MARKER)):
        _log(f"{target / MARKER} is {problem}; removing the copy anyway (the marker names it ours)")
    # Renamed away first, so an interrupted removal leaves a .disabled leftover, not a half copy.
    aside = _aside(custom_nodes, "old")
    os.rename(target, aside)
    _remove(aside)
    _log(f"removed {target}")
    return 0


def check_pack(custom_nodes: Path) -> int:
    """The ``--check`` line(s) for the pack in custom_nodes; 0 when installed and sound."""
    target = custom_nodes / LINK_NAME
    rc = 0
    for entry in leftovers(custom_nodes):
        _log(f"{entry}: left by an interrupted run (install.py --comfyui {custom_nodes.parent} clears it)")
        rc = 1
    if not _ours(target):
        what = "exists and was not made by this installer" if os.path.lexists(target) else "not installed"
        _log(f"{target}: {what}")
        return 1
    if target.is_symlink():
        _log(f"{target}: installed (link -> {PACK_DIR})")
        return rc
    problem = marker_problem(target / MARKER)
    if problem:
        _log(f"{target}: installed (copy), but its marker {target / MARKER} is {problem}; "
             f"install.py --comfyui {custom_nodes.parent} --copy rewrites it")
        return 1
    _log(f"{target}: installed (copy)")
    return rc


def training_line(comfyui: Path) -> str:
    """Whether Train LoRA (Immiscible) can train on this checkout (the same check the node makes at queue time)."""
    why = checkout_support(comfyui)
    if why is None:
        return f"training: Train LoRA (Immiscible) is supported (ComfyUI {checkout_version(comfyui)})"
    return f"training: Train LoRA (Immiscible) is not supported: {why}"


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
    if uninstall:
        return uninstall_pack(custom_nodes)
    python = find_python(root, python)
    if check:
        installed = check_pack(custom_nodes)
        _log(training_line(root))
        return ensure_requirements(python, check=True) | installed
    # A python that cannot run fails here, before custom_nodes is touched.
    try:
        missing_requirements(python)
    except (OSError, subprocess.CalledProcessError) as exc:
        _log(f"cannot run {python}: {exc}; nothing was installed")
        return 1
    rc, change = install_pack(custom_nodes, copy)
    if change is None:
        return rc
    try:
        rc = ensure_requirements(python)
    except BaseException:
        change.undo()
        raise
    if rc:
        change.undo()
        _log("the requirements could not be installed, so the pack was not installed either")
    else:
        change.commit()
    return rc
