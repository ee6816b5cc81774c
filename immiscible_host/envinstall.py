"""Install, probe and uninstall an adapter's start-up hook in a target Python environment.

Generic over the adapter: each adapter names its package, its ``.pth`` file (one guarded line that
imports ``<package>.startup`` at interpreter start-up) and its marker file (what the install did).
The pack itself is ``pip install --no-deps -e``'d into the environment only when that environment
does not import it already; uninstalling removes it only when this adapter installed it **and** no
other adapter's start-up hook (``immiscible_*_startup.pth``) is left in that environment, so
uninstalling one adapter never breaks another that shares the environment and the checkout.
Imports nothing heavy; the target interpreter is only ever run as a subprocess.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .points import ABSENT, BROKEN, OK

PACK_DIR = Path(__file__).resolve().parent.parent
DIST_NAME = "immiscible-diffusion"

_PROBE = r"""
import importlib, json, sys, sysconfig
package, points = sys.argv[1], json.loads(sys.argv[2])
out = {"python": sys.executable, "version": sys.version.split()[0], "site_packages": sysconfig.get_paths()["purelib"]}
for name in (package, "immiscible_host"):
    try:
        out[name] = importlib.import_module(name).__file__
    except Exception:
        out[name] = None
try:
    out["hook_active"] = importlib.import_module(package + ".hook").installed()
except Exception:
    out["hook_active"] = False
out["external"] = {}
for name, module, attribute in points:
    try:
        obj = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
        out["external"][name] = None
    except Exception as e:
        out["external"][name] = f"{type(e).__name__}: {e}"
try:
    from importlib.metadata import version
    out["dist"] = version("immiscible-diffusion")
except Exception:
    out["dist"] = None
try:
    import torch
    out["torch"] = torch.__version__
except Exception:
    out["torch"] = None
print("@@" + json.dumps(out))
"""


def pth_line(package: str, what: str) -> str:
    """The guarded start-up line: never raises, so unrelated programs are unaffected."""
    return (f'import sys; exec("try:\\n    import {package}.startup\\nexcept Exception:\\n    pass")  '
            f"# immiscible-diffusion: {what} start-up hook (remove with install.py --uninstall)\n")


def probe(python: str, package: str, external=()) -> dict:
    """What ``python`` sees: site-packages, where ``package`` and ``immiscible_host`` import from,
    whether ``package``'s hook is active, the dist version, torch, and each of ``external``'s
    points (``PatchPoint`` rows outside the host's tree) -> None (found) or why not."""
    spec = json.dumps([(p.name, p.module, p.attribute) for p in external])
    res = subprocess.run([python, "-c", _PROBE, package, spec], capture_output=True, text=True, cwd="/")
    for line in res.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"cannot run {python}: {res.stderr.strip()[-500:]}")


def from_this_pack(path: str | None) -> bool:
    return bool(path) and Path(path).resolve().is_relative_to(PACK_DIR)


def pip(python: str, say, *args: str) -> int:
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd).returncode


def install(python: str, package: str, pth_name: str, marker_name: str, line: str, say, **record) -> int:
    """Make ``package`` importable in ``python``'s environment and write its start-up line (idempotent).

    ``record`` (e.g. the host checkout) is kept in the marker file next to the ``.pth``.
    """
    info = probe(python, package)
    site = Path(info["site_packages"])
    marker = site / marker_name
    kept = json.loads(marker.read_text()) if marker.exists() else {}
    if info[package] and not from_this_pack(info[package]):
        say(f"ERROR: {python} already imports another copy of {package}: {info[package]}")
        return 1
    if from_this_pack(info[package]) and from_this_pack(info.get("immiscible_host")):
        say(f"pack already importable in {python}: {info[package]}")
    else:
        rc = pip(python, say, "install", "--no-deps", "--no-build-isolation", "-e", str(PACK_DIR))
        if rc:
            say(f"ERROR: pip install -e {PACK_DIR} failed (exit {rc})")
            return rc
        if not info["dist"]:
            kept["pip_installed"] = True
    pth = site / pth_name
    if not pth.exists() or pth.read_text() != line:
        pth.write_text(line)
        say(f"wrote start-up hook {pth}")
    else:
        say(f"start-up hook present: {pth}")
    kept.update(pack=str(PACK_DIR), python=python, **record)
    marker.write_text(json.dumps(kept, indent=1) + "\n")
    return 0


def other_hooks(site: Path, pth_name: str) -> list[str]:
    """Other adapters' start-up hooks in the same site-packages."""
    return sorted(p.name for p in site.glob("immiscible_*_startup.pth") if p.name != pth_name)


def uninstall(python: str, package: str, pth_name: str, marker_name: str, say) -> int:
    """Remove the start-up line and, if this adapter installed the pack and no other adapter's hook
    needs it, the pack (idempotent)."""
    info = probe(python, package)
    site = Path(info["site_packages"])
    marker = site / marker_name
    kept = json.loads(marker.read_text()) if marker.exists() else {}
    pth = site / pth_name
    if pth.exists():
        pth.unlink()
        say(f"removed {pth}")
    rc = 0
    others = other_hooks(site, pth_name)
    if kept.get("pip_installed") and info["dist"] and not others:
        rc = pip(python, say, "uninstall", "-y", DIST_NAME)
    elif info["dist"]:
        why = (f"still used by {', '.join(others)}" if others
               else "it was installed before this installer ran")
        say(f"{DIST_NAME} {info['dist']} left in place: {why}")
    if marker.exists():
        marker.unlink()
    return rc


def read_marker(site: str, marker_name: str) -> dict:
    marker = Path(site) / marker_name
    try:
        return json.loads(marker.read_text()) if marker.exists() else {}
    except (OSError, json.JSONDecodeError):
        return {}


# --------------------------------------------------------------------------- --check report


def report_environment(info: dict, package: str, pth_name: str, reinstall: str, say) -> bool:
    """Say which Python, pack and start-up hook ``info`` (:func:`probe`) shows; True when all are in place.

    ``reinstall`` is the command that mends an incomplete install (``"install.py --sd-scripts"``).
    """
    good = True
    say(f"python: {info['python']} (Python {info['version']}, torch {info['torch']})")
    if info[package] and info.get("immiscible_host"):
        say(f"pack: {DIST_NAME} {info['dist'] or '(not pip-installed)'} -> {info[package]}")
    elif info[package]:
        say(f"pack: INCOMPLETE, {info[package]} imports but immiscible_host does not "
            f"(an install from an older version: run {reinstall} again)")
        good = False
    else:
        say("pack: NOT importable in this environment")
        good = False
    pth = Path(info["site_packages"]) / pth_name
    say(f"start-up hook: {pth} {'present' if pth.exists() else 'MISSING'}, "
        f"{'active' if info['hook_active'] else 'NOT active'} at interpreter start-up")
    return good and bool(pth.exists() and info["hook_active"])


def format_point(name: str, status) -> str:
    """One ``--check`` line of a patch point's ``PointStatus``: ``ok``, ``absent`` (not in this host
    version) or ``BROKEN``, with where it was found or why not."""
    word = {OK: "ok", ABSENT: "absent", BROKEN: "BROKEN"}[status.state]
    return f"  {word:<7} {name}  [{status.detail}]"


def report_points(rows, trainers, needed: set, say) -> bool:
    """Say each patch point's status and each trainer's; True unless a point in ``needed`` is broken.

    ``rows``: ``(point name, PointStatus)``; ``trainers``: ``(script, what it does, broken?)``.
    """
    for name, status in rows:
        say(format_point(name, status))
    say("trainers in this checkout:")
    for script, what, problem in trainers:
        say(f"  {'BROKEN' if problem else 'ok':<7} {script}: {what}")
    return not any(status.state == BROKEN and name in needed for name, status in rows)
