"""Install, check and uninstall the sd-scripts start-up hook in a Python environment.

``install.py --sd-scripts PATH [--python VENV_PYTHON]`` calls :func:`main`. Installing:

1. ``pip install --no-deps --no-build-isolation -e PACK`` into the target environment, unless
   it already imports this pack, ``immiscible_host`` included (torch and friends are left alone);
2. writes ``immiscible_kohya_startup.pth`` into its site-packages: one guarded line that
   installs :mod:`kohya_patch.hook` at interpreter start-up;
3. writes ``immiscible_kohya_install.json`` next to it, recording what step 1 did, so that
   ``--uninstall`` removes only what was added.

Nothing inside the sd-scripts tree is touched. Every step is idempotent. ``--check`` prints
one line per patch point of :data:`kohya_patch.points.POINTS`: ``ok``, ``absent`` (not in this
sd-scripts version) or ``BROKEN`` (why).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from immiscible_host import envinstall
from immiscible_host.points import BROKEN, SUPPORT, PointStatus, absent, broken, inspect_sources, ok

from . import version
from .points import NOT_IN_VERSION, POINTS

PACK_DIR = envinstall.PACK_DIR
DIST_NAME = "immiscible-diffusion"
PTH_NAME = "immiscible_kohya_startup.pth"
MARKER_NAME = "immiscible_kohya_install.json"
PTH_LINE = ('import sys; exec("try:\\n    import kohya_patch.startup\\nexcept Exception:\\n    pass")  '
            '# immiscible-diffusion: sd-scripts start-up hook (remove with install.py --uninstall)\n')

def _say(msg: str) -> None:
    print(f"[immiscible sd-scripts] {msg}")


def probe(python: str, external=()) -> dict:
    """What the target interpreter sees (site-packages, pack location, hook, dist, torch).

    ``external``: patch points outside sd-scripts' tree (accelerate) to look up there; the
    answer's ``"external"`` maps each name to None (found) or why not.
    """
    return envinstall.probe(python, "kohya_patch", external)


# --------------------------------------------------------------------------- sd-scripts inspection


def patch_point_report(sd_scripts: Path, external: dict | None = None) -> list[tuple[str, PointStatus]]:
    """``(name, status)`` for every point of :data:`kohya_patch.points.POINTS`.

    Points in sd-scripts' tree are read statically (nothing is imported); ``external`` maps the
    names of the others (accelerate) to None (found in the target environment) or why not. A point
    that a known version lacks by design (:data:`kohya_patch.points.NOT_IN_VERSION`) is ``absent``.
    """
    found = dict(inspect_sources(sd_scripts, POINTS))
    limits = NOT_IN_VERSION.get(version.fingerprint(sd_scripts), {})
    rows = []
    for point in POINTS:
        if point in found:
            status = found[point]
            if status.state == BROKEN and point.name in limits:
                status = absent(f"{status.detail}: not in this version; {limits[point.name]}")
            rows.append((point.name, status))
        elif external is None or point.name not in external:
            rows.append((point.name, ok("outside sd-scripts; checked when a run starts")))
        elif external[point.name] is None:
            rows.append((point.name, ok(f"{point.module}.{point.attribute} in the target environment")))
        else:
            rows.append((point.name, broken(f"{point.module}.{point.attribute}: {external[point.name]}")))
    return rows


def shipped_trainers(sd_scripts: Path) -> list[str]:
    """The trainer scripts in this checkout: ``*train*.py`` at its top level, plus ``fine_tune.py``."""
    names = {p.name for p in sd_scripts.glob("*train*.py")} | {p.name for p in sd_scripts.glob("fine_tune.py")}
    return sorted(n for n in names if "minimal_inference" not in n)


def trainer_report(sd_scripts: Path, statuses: dict[str, PointStatus]) -> list[tuple[str, str, bool]]:
    """``(script, what --immiscible_k does there, problem)`` for every shipped trainer.

    ``problem`` is True when the script's noise point is broken (not merely absent by design).
    """
    rows = []
    for script in shipped_trainers(sd_scripts):
        point = next((p for p in POINTS if script in p.scripts), None)
        if point is None:
            rows.append((script, "not a trainer this pack knows: with --immiscible_k > 1 it stops at its first step "
                                 "unless its noise goes through a patch point above", False))
            continue
        status = statuses.get(point.name)
        if status is not None and status.ok:
            rows.append((script, f"selects through {point.name}", False))
        else:
            why = status.detail if status is not None else "not checked"
            rows.append((script, f"refuses --immiscible_k > 1 at start-up: {point.name} is "
                                 f"{status.state if status else 'unknown'} ({why})", status is not None
                         and status.state == BROKEN))
    return rows


format_point = envinstall.format_point


def sd_scripts_version(sd_scripts: Path) -> str:
    """``git describe`` and the commit, a tested version recognised by its files, or ``unknown``."""
    return version.describe(sd_scripts)


def upstream_knn_noise(sd_scripts: Path) -> bool:
    """Whether this sd-scripts has a noise selection of its own (``--knn_noise_k``, ``--noise_selection``)."""
    try:
        text = (sd_scripts / "library/train_util.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return "--knn_noise_k" in text or "--noise_selection" in text


# --------------------------------------------------------------------------- actions


def install_hook(sd_scripts: Path, python: str) -> int:
    """Make the pack importable in ``python``'s environment, write the start-up hook, then ``report``."""
    rc = envinstall.install(python, "kohya_patch", PTH_NAME, MARKER_NAME, PTH_LINE, _say, sd_scripts=str(sd_scripts))
    return rc or report(sd_scripts, python)


def uninstall_hook(python: str) -> int:
    """Remove the start-up hook (and the pack, if this installer put it there and no other hook needs it)."""
    rc = envinstall.uninstall(python, "kohya_patch", PTH_NAME, MARKER_NAME, _say)
    _say("uninstalled (nothing inside sd-scripts was ever changed)")
    return rc


def report(sd_scripts: Path | None, python: str) -> int:
    info = probe(python, [p for p in POINTS if not p.in_host])
    good = envinstall.report_environment(info, "kohya_patch", PTH_NAME, "install.py --sd-scripts", _say)
    if sd_scripts is None:
        recorded = envinstall.read_marker(info["site_packages"], MARKER_NAME).get("sd_scripts")
        sd_scripts = Path(recorded) if recorded else None
    if sd_scripts is None or not (sd_scripts / "library" / "train_util.py").exists():
        _say(f"sd-scripts: {'not given' if sd_scripts is None else f'no checkout at {sd_scripts}'}")
        return 0 if good else 1
    _say(f"sd-scripts: {sd_scripts}, version {sd_scripts_version(sd_scripts)}")
    _say("own noise selection (--knn_noise_k, PR #2374 or a fork's --noise_selection): "
         f"{'present (setting it on together with --immiscible_k > 1 is a start-up error)' if upstream_knn_noise(sd_scripts) else 'absent'}")
    _say("patch points (absent = not in this sd-scripts version, fine unless you run a trainer that needs it):")
    rows = patch_point_report(sd_scripts, info.get("external"))
    trainers = trainer_report(sd_scripts, dict(rows))
    needed = {p.name for p in POINTS if p.kind == SUPPORT or any(t in p.scripts for t, _, _ in trainers)}
    good &= envinstall.report_points(rows, trainers, needed, _say)
    _say("all good" if good else "problems found (see above)")
    return 0 if good else 1


def main(sd_scripts: str | None = None, python: str | None = None, check: bool = False,
         uninstall: bool = False) -> int:
    """Entry point used by ``install.py``; returns a process exit code."""
    python = python or sys.executable
    sd = Path(sd_scripts).expanduser().resolve() if sd_scripts else None
    try:
        if uninstall:
            return uninstall_hook(python)
        if check:
            return report(sd, python)
        if sd is None or not (sd / "library" / "train_util.py").exists():
            _say(f"ERROR: --sd-scripts must name a kohya-ss/sd-scripts checkout (got {sd_scripts!r})")
            return 2
        return install_hook(sd, python)
    except (OSError, RuntimeError, json.JSONDecodeError) as exc:
        _say(f"ERROR: {exc}")
        return 1
