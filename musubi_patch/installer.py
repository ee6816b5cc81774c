"""Install, check and uninstall the musubi-tuner start-up hook in a Python environment.

``install.py --musubi-tuner PATH [--python VENV_PYTHON]`` calls :func:`main`. Installing makes the
pack importable in that environment (``pip install --no-deps -e``, only if it is not already) and
writes ``immiscible_musubi_startup.pth`` plus ``immiscible_musubi_install.json`` into its
site-packages (:mod:`immiscible_host.envinstall`). Nothing inside the musubi-tuner tree is touched;
every step is idempotent. ``--check`` prints one line per patch point of
:data:`musubi_patch.points.POINTS` (``ok`` / ``absent`` / ``BROKEN``) and what each shipped trainer does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from immiscible_host import envinstall
from immiscible_host.points import BROKEN, SUPPORT, PointStatus, broken, inspect_sources, ok

from . import version
from .points import POINTS

PACKAGE = "musubi_patch"
PTH_NAME = "immiscible_musubi_startup.pth"
MARKER_NAME = "immiscible_musubi_install.json"
PTH_LINE = envinstall.pth_line(PACKAGE, "musubi-tuner")


def _say(msg: str) -> None:
    print(f"[immiscible musubi-tuner] {msg}")


def is_checkout(root: Path | None) -> bool:
    return root is not None and (root / "src/musubi_tuner/training/trainer_base.py").exists()


def patch_point_report(root: Path, external: dict | None = None) -> list[tuple[str, PointStatus]]:
    """``(name, status)`` for every point: musubi's files read statically from ``root/src``,
    accelerate's looked up in the target environment (``external``: name -> None or why not)."""
    found = dict(inspect_sources(root / "src", POINTS))
    rows = []
    for point in POINTS:
        if point in found:
            rows.append((point.name, found[point]))
        elif external is None or point.name not in external:
            rows.append((point.name, ok("outside musubi-tuner; checked when a run starts")))
        elif external[point.name] is None:
            rows.append((point.name, ok(f"{point.module}.{point.attribute} in the target environment")))
        else:
            rows.append((point.name, broken(f"{point.module}.{point.attribute}: {external[point.name]}")))
    return rows


def shipped_trainers(root: Path) -> list[str]:
    """The trainer scripts in ``src/musubi_tuner``: ``*_train_network*.py`` and ``*_train.py``."""
    pkg = root / "src/musubi_tuner"
    return sorted({p.name for p in pkg.glob("*_train_network*.py")} | {p.name for p in pkg.glob("*_train.py")})


def trainer_report(root: Path, statuses: dict[str, PointStatus]) -> list[tuple[str, str, bool]]:
    """``(script, what --immiscible_k does there, problem)`` for every shipped trainer."""
    rows = []
    for script in shipped_trainers(root):
        point = next((p for p in POINTS if script in p.scripts), None)
        if point is None:
            rows.append((script, "not a trainer this pack knows: with --immiscible_k > 1 it is selected if it draws "
                                 "its noise in the shared training loop, else it stops before its first step", False))
            continue
        status = statuses.get(point.name)
        if status is not None and status.ok:
            rows.append((script, f"selects through {point.name}", False))
        else:
            rows.append((script, f"refuses --immiscible_k > 1 at start-up: {point.name} is {status}",
                         status is not None and status.state == BROKEN))
    return rows


format_point = envinstall.format_point


def report(root: Path | None, python: str) -> int:
    info = envinstall.probe(python, PACKAGE, [p for p in POINTS if not p.in_host])
    good = envinstall.report_environment(info, PACKAGE, PTH_NAME, "install.py --musubi-tuner", _say)
    if root is None:
        recorded = envinstall.read_marker(info["site_packages"], MARKER_NAME).get("musubi_tuner")
        root = Path(recorded) if recorded else None
    if not is_checkout(root):
        _say(f"musubi-tuner: {'not given' if root is None else f'no checkout at {root}'}")
        return 0 if good else 1
    _say(f"musubi-tuner: {root}, version {version.describe(root)}")
    _say("patch points:")
    rows = patch_point_report(root, info.get("external"))
    trainers = trainer_report(root, dict(rows))
    needed = {p.name for p in POINTS if p.kind == SUPPORT and not p.name.startswith("hv_train.")}
    needed |= {p.name for p in POINTS if any(t in p.scripts for t, _, _ in trainers)}
    good &= envinstall.report_points(rows, trainers, needed, _say)
    _say("all good" if good else "problems found (see above)")
    return 0 if good else 1


def main(musubi_tuner: str | None = None, python: str | None = None, check: bool = False,
         uninstall: bool = False) -> int:
    """Entry point used by ``install.py``; returns a process exit code."""
    python = python or sys.executable
    root = Path(musubi_tuner).expanduser().resolve() if musubi_tuner else None
    try:
        if uninstall:
            rc = envinstall.uninstall(python, PACKAGE, PTH_NAME, MARKER_NAME, _say)
            _say("uninstalled (nothing inside musubi-tuner was ever changed)")
            return rc
        if check:
            return report(root, python)
        if not is_checkout(root):
            _say(f"ERROR: --musubi-tuner must name a kohya-ss/musubi-tuner checkout (v0.3.0 or later, with "
                 f"src/musubi_tuner/training/trainer_base.py; got {musubi_tuner!r})")
            return 2
        rc = envinstall.install(python, PACKAGE, PTH_NAME, MARKER_NAME, PTH_LINE, _say, musubi_tuner=str(root))
        return rc or report(root, python)
    except (OSError, RuntimeError, json.JSONDecodeError) as exc:
        _say(f"ERROR: {exc}")
        return 1
