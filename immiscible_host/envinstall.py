"""Install, probe and uninstall an adapter's start-up hook in a target Python environment.

Generic over the adapter: each adapter names its package, its ``.pth`` file (one guarded line that
imports ``<package>.startup`` at interpreter start-up) and its marker file (what the install did).
The pack itself is ``pip install --no-deps -e``'d into the environment only when that environment
does not import it already; uninstalling removes it only when this adapter installed it **and** no
other adapter's start-up hook (``immiscible_*_startup.pth``) is left in that environment, so
uninstalling one adapter never breaks another that shares the environment and the checkout.

Installing runs in an order that an interruption (even SIGKILL) at any point cannot turn into a
start-up hook pointing at a pack that does not import: (1) the marker records that the pack is
about to be pip-installed, (2) ``pip install``, (3) the target interpreter must import
``immiscible``, ``immiscible_host`` and the adapter package from this pack (a missing dependency
such as torch or numpy is named, and a pip install of this run is undone), (4) only then the
``.pth``, (5) the final marker. Every file is written atomically (a temporary file in the same
folder, then ``os.replace``). A marker that cannot be read (empty, not JSON: an interrupted write
by an older version) is named, reported by ``--check``, rewritten by install and removed by
uninstall. Imports nothing heavy; the target interpreter is only ever run as a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .points import ABSENT, BROKEN, OK

PACK_DIR = Path(__file__).resolve().parent.parent
DIST_NAME = "immiscible-diffusion"
#: The oldest Python the pack runs on (``requires-python`` in pyproject.toml).
MIN_PYTHON = (3, 10)
#: What ``import immiscible`` needs in the target environment (``dependencies`` in pyproject.toml).
DEPENDENCIES = ("torch", "numpy")
#: The pack's own top-level packages that the target must import (with the adapter's package).
PACK_MODULES = ("immiscible_host", "immiscible")
#: Seconds the target interpreter gets to answer the probe (it imports torch).
PROBE_TIMEOUT = 300

_PROBE_BODY = r"""
import importlib, importlib.util, json, sys, sysconfig
package, points, dependencies, own = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
out = {"python": sys.executable, "version": sys.version.split()[0], "site_packages": sysconfig.get_paths()["purelib"]}
# did the start-up line install the hook? (looked at before this probe imports anything of the pack)
out["hook_active"] = any(type(f).__name__ == "ImportHook" and getattr(f, "name", None) == package for f in sys.meta_path)
if not out["hook_active"]:
    try:
        out["hook_active"] = bool(importlib.import_module(package + ".hook").installed())
    except Exception:
        pass
out["import_errors"], out["missing_modules"] = {}, {}
for name in [package] + own:
    try:
        out[name] = importlib.import_module(name).__file__
    except Exception as e:
        out[name] = None
        out["import_errors"][name] = f"{type(e).__name__}: {e}"
        if isinstance(e, ModuleNotFoundError) and e.name:
            out["missing_modules"][name] = e.name.split(".")[0]
out["missing_dependencies"] = [d for d in dependencies if importlib.util.find_spec(d) is None]
out["pip"] = importlib.util.find_spec("pip") is not None
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

# The guard runs on any Python (2.x included) and answers before the body, which needs 3.10, is compiled.
_PROBE = ("import sys, json\n"
          "if tuple(sys.version_info[:2]) < %r:\n"
          "    sys.stdout.write('@@' + json.dumps({'python': sys.executable, 'version': sys.version.split()[0], "
          "'too_old': True}) + '\\n')\n"
          "    sys.exit(0)\n"
          "exec(compile(%r, '<immiscible probe>', 'exec'))\n") % (MIN_PYTHON, _PROBE_BODY)

_FIX_PYTHON = ("--python must name the Python interpreter of the trainer's environment "
               "(e.g. /path/to/venv/bin/python; on Windows venv\\Scripts\\python.exe)")


def pth_line(package: str, what: str) -> str:
    """The guarded start-up line: never raises, so unrelated programs are unaffected."""
    return (f'import sys; exec("try:\\n    import {package}.startup\\nexcept Exception:\\n    pass")  '
            f"# immiscible-diffusion: {what} start-up hook (remove with install.py --uninstall)\n")


class ProbeError(RuntimeError):
    """The target interpreter could not be run, or did not answer as a Python 3.10+ would."""

    def __init__(self, python: str, why: str):
        super().__init__(f"cannot use {python} as the target Python: {why}. {_FIX_PYTHON}")


def _excerpt(text: str, limit: int = 600) -> str:
    """``text`` on one line, quoted, its end kept when long."""
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return '"' + (text if len(text) <= limit else "..." + text[-limit:]) + '"'


def _cannot_start(python: str, exc: OSError) -> str:
    """Why ``python`` could not be started at all."""
    path = Path(python)
    if os.path.isdir(python):
        near = [c for c in (path / "bin/python", path / "bin/python3", path / "Scripts/python.exe") if c.is_file()]
        return "it is a folder, not a Python interpreter" + (f" (did you mean {near[0]}?)" if near else "")
    if os.path.islink(python) and not path.exists():
        return (f"it is a link to {os.readlink(python)}, which does not exist (was the environment's base Python "
                "moved or removed? then recreate the environment)")
    if not os.path.lexists(python):
        return "no such file"
    if not os.access(python, os.X_OK):
        return "it is not executable"
    try:
        first = path.open("rb").readline(200).decode("utf-8", "replace").strip()
    except OSError:
        first = ""
    if first.startswith("#!"):
        return f"it is a script whose first line {first} names an interpreter that cannot be run ({exc.strerror or exc})"
    return f"running it failed: {exc.strerror or exc}"


def _answer(python: str, res: subprocess.CompletedProcess) -> dict:
    """The probe's answer in ``res``, or a :class:`ProbeError` saying what was run and what came back."""
    for line in res.stdout.splitlines():
        if line.startswith("@@"):
            try:
                answer = json.loads(line[2:])
            except ValueError:
                raise ProbeError(python, f"its answer to the probe (`{python} -c <probe script>`) is not JSON: "
                                         f"{_excerpt(line, 200)}") from None
            if answer.get("too_old"):
                raise ProbeError(python, f"it is Python {answer.get('version')}; the pack needs Python "
                                         f"{'.'.join(map(str, MIN_PYTHON))} or newer")
            return answer
    came = f"was killed by signal {-res.returncode}" if res.returncode < 0 else f"exited with {res.returncode}"
    shown = [f"{what} {_excerpt(text)}" for what, text in (("stderr", res.stderr), ("stdout", res.stdout))
             if text.strip()]
    came += (" and printed no probe answer: " + ", ".join(shown)) if shown else " and printed nothing"
    if res.returncode == 0 or not shown:
        came += " (it is not a Python interpreter)"
    raise ProbeError(python, f"`{python} -c <probe script>` {came}")


def probe(python: str, package: str, external=()) -> dict:
    """What ``python`` sees: site-packages, where ``package``, ``immiscible_host`` and ``immiscible``
    import from (``import_errors``: name -> why not; ``missing_modules``: name -> the module it
    lacks; ``missing_dependencies``: torch/numpy not installed), whether ``package``'s hook is
    active, whether it has pip, the dist version, torch, and each of ``external``'s points
    (``PatchPoint`` rows outside the host's tree) -> None (found) or why not.

    Raises :class:`ProbeError` (a ``RuntimeError``) naming what was run and what came back when
    ``python`` is missing, a folder, not executable, not Python, older than 3.10 or broken.
    """
    spec = json.dumps([(p.name, p.module, p.attribute) for p in external])
    cmd = [python, "-c", _PROBE, package, spec, json.dumps(DEPENDENCIES), json.dumps(list(PACK_MODULES))]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd="/", stdin=subprocess.DEVNULL,
                             timeout=PROBE_TIMEOUT, errors="replace")
    except subprocess.TimeoutExpired:
        raise ProbeError(python, f"`{python} -c <probe script>` did not answer within {PROBE_TIMEOUT} s") from None
    except OSError as exc:
        raise ProbeError(python, _cannot_start(python, exc)) from None
    return _answer(python, res)


def from_this_pack(path: str | None) -> bool:
    return bool(path) and Path(path).resolve().is_relative_to(PACK_DIR)


def pack_problem(info: dict, package: str) -> str | None:
    """Why the pack does not import in the environment :func:`probe` saw (None: it does).

    A missing dependency is named, with the command that installs it there.
    """
    errors = info.get("import_errors") or {}
    for name in (package, *PACK_MODULES):
        if name not in info or info[name]:
            continue  # imports (or an answer from an older probe, which did not try)
        why = errors.get(name, "it does not import")
        missing = list(info.get("missing_dependencies") or ())
        missing += sorted({m for m in (info.get("missing_modules") or {}).values()
                           if m not in (package, *PACK_MODULES, *missing)})
        if missing:
            return (f"`import {name}` fails there ({why}): {', '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} not installed in that environment. Install "
                    f"{'it' if len(missing) == 1 else 'them'} there ({info.get('python')} -m pip install "
                    f"{' '.join(missing)}{'; torch: the build for your CUDA' if 'torch' in missing else ''})")
        return f"`import {name}` fails there ({why})"
    return None


def pip(python: str, say, *args: str) -> int:
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    say("$ " + " ".join(cmd))
    return subprocess.run(cmd).returncode


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, text: str, hint: str = "run install.py as the environment's owner") -> None:
    """Write ``text`` to ``path`` so that a reader (or an interruption) sees the old file or the new one,
    never a part: a temporary file in the same folder, flushed, then ``os.replace``. Keeps an existing
    file's permissions; a new one gets the usual ``0o666 & ~umask``. ``hint`` ends the error when the
    folder cannot be written."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # not *.pth: site.py must never read it
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror} (can this user write to "
                                   f"{path.parent}? {hint})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temporaries(site: Path, *names: str) -> None:
    """Remove temporary files that an interrupted :func:`write_atomic` of ``names`` left in ``site``."""
    for name in names:
        for tmp in Path(site).glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
            except OSError:
                pass


def load_marker(marker: Path) -> tuple[dict, str | None]:
    """``(what the marker records, None)``; ``({}, why)`` when it exists but cannot be read; ``({}, None)``
    when there is none."""
    marker = Path(marker)
    if not marker.exists():
        return {}, None
    try:
        text = marker.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"cannot be read: {getattr(exc, 'strerror', None) or exc}"
    if not text.strip():
        return {}, "it is empty"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return {}, f"it is not JSON ({exc})"
    if not isinstance(data, dict):
        return {}, f"it holds a JSON {type(data).__name__}, not an object"
    return data, None


def _marker_name_for(pth_name: str) -> str:
    """The marker beside a ``immiscible_<short>_startup.pth`` hook: ``immiscible_<short>_install.json``."""
    return pth_name[: -len("_startup.pth")] + "_install.json" if pth_name.endswith("_startup.pth") else ""


# --------------------------------------------------------------------------- install / uninstall


def install(python: str, package: str, pth_name: str, marker_name: str, line: str, say, **record) -> int:
    """Make ``package`` importable in ``python``'s environment and write its start-up line (idempotent).

    ``record`` (e.g. the host checkout) is kept in the marker file next to the ``.pth``. The ``.pth``
    is written only once the target imports the pack; on failure nothing of this run is left.
    """
    info = probe(python, package)
    site = Path(info["site_packages"])
    marker, pth = site / marker_name, site / pth_name
    remove_stale_temporaries(site, pth_name, marker_name)
    kept, unreadable = load_marker(marker)
    if unreadable:
        say(f"install marker {marker} is unreadable ({unreadable}); rewriting it")
        if info["dist"]:
            kept["pip_installed"] = None  # unknown: --uninstall then leaves the pack and says so
    before = dict(kept) if marker.exists() else None
    for name in (package, *PACK_MODULES):
        where = info.get(name)
        if where and not from_this_pack(where):
            say(f"ERROR: {python} already imports another copy of {name}: {where} (this pack is {PACK_DIR}); "
                f"remove that copy there ({python} -m pip uninstall {DIST_NAME}) or use another environment. "
                "Nothing was changed.")
            return 1
    own_missing = {m for m in (info.get("missing_modules") or {}).values() if m in (package, *PACK_MODULES)}
    added = intent = False  # this run pip-installed the pack / wrote the marker before pip
    if from_this_pack(info[package]) and from_this_pack(info.get("immiscible_host")) and not own_missing:
        say(f"pack already importable in {python}: {info[package]}")
    else:
        if info.get("pip") is False:
            say(f"ERROR: {python} has no pip (`{python} -m pip` fails), which installing the pack needs; "
                f"install pip there ({python} -m ensurepip) and run install.py again. Nothing was changed.")
            return 1
        if not info["dist"]:
            # recorded before pip runs: an interrupted install still tells --uninstall that the pack is ours
            kept["pip_installed"] = intent = True
            write_atomic(marker, json.dumps({**kept, "pack": str(PACK_DIR), "python": python, **record},
                                            indent=1) + "\n")
        rc = pip(python, say, "install", "--no-deps", "--no-build-isolation", "-e", str(PACK_DIR))
        if rc:
            say(f"ERROR: pip install -e {PACK_DIR} failed (exit {rc}) in {python}; no start-up hook was written")
            _undo(python, say, False, intent, marker, before)
            return rc
        added = not info["dist"]
        info = probe(python, package)
    problem = pack_problem(info, package)
    if problem is None and not (from_this_pack(info[package]) and from_this_pack(info.get("immiscible_host"))):
        problem = f"{package} or immiscible_host still does not import from {PACK_DIR}"
    if problem:
        say(f"ERROR: the pack does not import in {python}: {problem}. Run install.py again once it imports there.")
        if pth.exists():
            say(f"the start-up hook {pth} of an earlier install is left as it was (it does nothing while the pack "
                "cannot be imported; install.py --check reports it); install.py --uninstall removes it")
        else:
            say("no start-up hook was written")
        _undo(python, say, added, intent, marker, before)
        return 1
    if not pth.exists() or pth.read_text(encoding="utf-8", errors="replace") != line:
        write_atomic(pth, line)
        say(f"wrote start-up hook {pth}")
    else:
        say(f"start-up hook present: {pth}")
    kept.update(pack=str(PACK_DIR), python=python, **record)
    write_atomic(marker, json.dumps(kept, indent=1) + "\n")
    return 0


def _undo(python: str, say, added: bool, intent: bool, marker: Path, before: dict | None) -> None:
    """Take back a failed install: the pack this run pip-installed (``added``) and the marker it wrote
    before pip ran (``intent``); the marker stays if the pack could not be removed."""
    if added:
        rc = pip(python, say, "uninstall", "-y", DIST_NAME)
        if rc:
            say(f"could not undo the pip install of this run (exit {rc}): {marker} keeps recording it, so "
                "install.py --uninstall removes it")
            return
        say(f"undid the pip install of this run ({DIST_NAME})")
    if not intent:
        return
    if before is None:
        marker.unlink(missing_ok=True)
    else:
        write_atomic(marker, json.dumps(before, indent=1) + "\n")


def other_hooks(site: Path, pth_name: str) -> list[str]:
    """Other adapters' start-up hooks in the same site-packages."""
    return sorted(p.name for p in site.glob("immiscible_*_startup.pth") if p.name != pth_name)


def uninstall(python: str, package: str, pth_name: str, marker_name: str, say) -> int:
    """Remove the start-up line and, if this adapter installed the pack and no other adapter's hook
    needs it, the pack (idempotent). An unreadable marker is removed with the hook; the pack is then
    left in place, since whether install.py pip-installed it cannot be known."""
    info = probe(python, package)
    site = Path(info["site_packages"])
    marker = site / marker_name
    remove_stale_temporaries(site, pth_name, marker_name)
    kept, unreadable = load_marker(marker)
    if unreadable:
        say(f"install marker {marker} is unreadable ({unreadable}); removing it with the start-up hook")
    pth = site / pth_name
    if pth.exists():
        pth.unlink()
        say(f"removed {pth}")
    rc = 0
    others = other_hooks(site, pth_name)
    if kept.get("pip_installed") and info["dist"] and not others:
        rc = pip(python, say, "uninstall", "-y", DIST_NAME)
        if rc:
            say(f"ERROR: pip uninstall {DIST_NAME} failed (exit {rc}); {marker} is kept so that "
                "install.py --uninstall can try again")
            return rc
    elif info["dist"]:
        if others:
            why = f"still used by {', '.join(others)}"
        elif unreadable or ("pip_installed" in kept and kept["pip_installed"] is None):
            why = (f"whether install.py pip-installed it is unknown (its install marker {marker} was unreadable); "
                   f"if nothing else uses it, remove it with `{python} -m pip uninstall -y {DIST_NAME}`")
        else:
            why = "it was installed before this installer ran"
        say(f"{DIST_NAME} {info['dist']} left in place: {why}")
    marker.unlink(missing_ok=True)
    return rc


def read_marker(site: str, marker_name: str) -> dict:
    """What the marker in ``site`` records ({} if there is none or it cannot be read)."""
    return load_marker(Path(site) / marker_name)[0]


# --------------------------------------------------------------------------- --check report


def report_environment(info: dict, package: str, pth_name: str, reinstall: str, say,
                       marker_name: str | None = None) -> bool:
    """Say which Python, pack, start-up hook and install marker ``info`` (:func:`probe`) shows; True
    when the pack imports (dependencies included), the hook is active and the marker is readable.

    ``reinstall`` is the command that mends an incomplete install (``"install.py --sd-scripts"``);
    ``marker_name`` defaults to the one beside ``pth_name`` (``immiscible_<short>_install.json``).
    """
    good = True
    say(f"python: {info['python']} (Python {info['version']}, torch {info['torch']})")
    problem = pack_problem(info, package) if info[package] and info.get("immiscible_host") else None
    if problem:
        say(f"pack: BROKEN, {problem}")
        good = False
    elif info[package] and info.get("immiscible_host"):
        say(f"pack: {DIST_NAME} {info['dist'] or '(not pip-installed)'} -> {info[package]}")
    elif info[package]:
        say(f"pack: INCOMPLETE, {info[package]} imports but immiscible_host does not "
            f"(an install from an older version: run {reinstall} again)")
        good = False
    else:
        say("pack: NOT importable in this environment")
        good = False
    site = Path(info["site_packages"])
    pth = site / pth_name
    say(f"start-up hook: {pth} {'present' if pth.exists() else 'MISSING'}, "
        f"{'active' if info['hook_active'] else 'NOT active'} at interpreter start-up")
    marker_name = marker_name or _marker_name_for(pth_name)
    unreadable = load_marker(site / marker_name)[1] if marker_name else None
    if unreadable:
        marker = site / marker_name
        say(f"install marker: {marker} is UNREADABLE ({unreadable}): run {reinstall} again to rewrite it "
            "(or install.py --uninstall to remove the hook and the marker)")
        good = False
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
