"""Install, check and uninstall a training program's start-up hook (``install.py --sd-scripts``,
``--musubi-tuner``), driven by the program's :class:`~immiscible_host.adapter.Host`.

Installing makes the pack importable in the trainer's environment (``pip install --no-deps -e``,
only if it is not already) and writes the host's ``.pth`` line and install marker into its
site-packages (:mod:`immiscible_host.envinstall`). Nothing inside the program's tree is touched;
every step is idempotent. ``--check`` prints the environment, one line per patch point of the
host's table (``ok`` / ``absent`` / ``BROKEN``) and what each shipped trainer does.
Imports nothing heavy; the target interpreter is only run as a subprocess.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import envinstall
from .adapter import Host
from .points import BROKEN, NOISE_KINDS, PointStatus, absent, broken, inspect_sources, needed_points, ok


def say_for(host: Host):
    return lambda msg: print(f"[immiscible {host.name}] {msg}")


def patch_point_report(host: Host, root: Path, external: dict | None = None) -> list[tuple[str, PointStatus]]:
    """``(name, status)`` for every point of the host's table.

    Points in the program's tree are read statically (nothing is imported); ``external`` maps the
    names of the others (accelerate) to None (found in the target environment) or why not. A point
    that a known version lacks by design (``host.not_in_version``) is ``absent``.
    """
    found = dict(inspect_sources(Path(root) / host.source_dir, host.points))
    limits = host.not_in_version.get(host.fingerprint(root), {}) if host.not_in_version else {}
    rows = []
    for point in host.points:
        if point in found:
            status = found[point]
            if status.state == BROKEN and point.name in limits:
                status = absent(f"{status.detail}: not in this version; {limits[point.name]}")
            rows.append((point.name, status))
        elif external is None or point.name not in external:
            rows.append((point.name, ok(f"outside {host.name}; checked when a run starts")))
        elif external[point.name] is None:
            rows.append((point.name, ok(f"{point.module}.{point.attribute} in the target environment")))
        else:
            rows.append((point.name, broken(f"{point.module}.{point.attribute}: {external[point.name]}")))
    return rows


def shipped_trainers(host: Host, root: Path) -> list[str]:
    """The trainer scripts in a checkout (``host.trainer_globs``; inference scripts left out)."""
    names = {p.name for g in host.trainer_globs for p in Path(root).glob(g)}
    return sorted(n for n in names if "inference" not in n)


def trainer_report(host: Host, root: Path, statuses: dict[str, PointStatus]) -> list[tuple[str, str, bool]]:
    """``(script, what --immiscible_k does there, problem)`` for every shipped trainer.

    ``problem`` is True when the script's noise point is broken (not merely absent by design).
    """
    rows = []
    for script in shipped_trainers(host, root):
        point = next((p for p in host.points if p.kind in NOISE_KINDS and script in p.scripts), None)
        if point is None:
            rows.append((script, host.unknown_trainer, False))
            continue
        status = statuses.get(point.name)
        if status is not None and status.ok:
            rows.append((script, f"selects through {point.name}", False))
        else:
            why = status.detail if status is not None else "not checked"
            rows.append((script, f"refuses --immiscible_k > 1 at start-up: {point.name} is "
                                 f"{status.state if status else 'unknown'} ({why})",
                         status is not None and status.state == BROKEN))
    return rows


def report(host: Host, root: Path | None, python: str) -> int:
    """``install.py --check``: the environment, the checkout's version, its points and trainers."""
    say = say_for(host)
    info = envinstall.probe(python, host.package, [p for p in host.points if not p.in_host])
    good = envinstall.report_environment(info, host.package, host.pth_name, f"install.py {host.install_flag}", say)
    if root is None:
        recorded = envinstall.read_marker(info["site_packages"], host.marker_name).get(host.marker_key)
        root = Path(recorded) if recorded else None
    if not host.is_checkout(root):
        say(f"{host.name}: {'not given' if root is None else f'no checkout at {root}'}")
        return 0 if good else 1
    say(f"{host.name}: {root}, version {host.describe(root)}")
    for line in (host.notes(root) if host.notes else []):
        say(line)
    say(f"patch points (absent = not in this {host.name} version, fine unless you run a trainer that needs it):")
    rows = patch_point_report(host, root, info.get("external"))
    trainers = trainer_report(host, root, dict(rows))
    good &= envinstall.report_points(rows, trainers, needed_points(host.points, [t for t, _, _ in trainers]), say)
    say("all good" if good else "problems found (see above)")
    return 0 if good else 1


def main(host: Host, root: str | None = None, python: str | None = None, check: bool = False,
         uninstall: bool = False) -> int:
    """Entry point used by ``install.py``; returns a process exit code."""
    say = say_for(host)
    python = python or sys.executable
    where = Path(root).expanduser().resolve() if root else None
    try:
        if uninstall:
            rc = envinstall.uninstall(python, host.package, host.pth_name, host.marker_name, say)
            say(f"uninstalled (nothing inside {host.name} was ever changed)")
            return rc
        if check:
            return report(host, where, python)
        if not host.is_checkout(where):
            say(f"ERROR: {host.install_flag} must name a checkout of {host.name} (with {host.checkout_file}; "
                f"got {root!r})")
            return 2
        rc = envinstall.install(python, host.package, host.pth_name, host.marker_name,
                                envinstall.pth_line(host.package, host.name), say, **{host.marker_key: str(where)})
        return rc or report(host, where, python)
    except (OSError, RuntimeError, json.JSONDecodeError) as exc:
        say(f"ERROR: {exc}")
        return 1
