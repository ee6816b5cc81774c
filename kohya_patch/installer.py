"""Install, check and uninstall the sd-scripts start-up hook in a Python environment.

``install.py --sd-scripts PATH [--python VENV_PYTHON]`` calls :func:`main`. Installing:

1. ``pip install --no-deps --no-build-isolation -e PACK`` into the target environment, unless
   it already imports this pack (torch and friends are left alone);
2. writes ``immiscible_kohya_startup.pth`` into its site-packages: one guarded line that
   installs :mod:`kohya_patch.hook` at interpreter start-up;
3. writes ``immiscible_kohya_install.json`` next to it, recording what step 1 did, so that
   ``--uninstall`` removes only what was added.

Nothing inside the sd-scripts tree is touched. Every step is idempotent.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
DIST_NAME = "immiscible-diffusion"
PTH_NAME = "immiscible_kohya_startup.pth"
MARKER_NAME = "immiscible_kohya_install.json"
PTH_LINE = ('import sys; exec("try:\\n    import kohya_patch.startup\\nexcept Exception:\\n    pass")  '
            '# immiscible-diffusion: sd-scripts start-up hook (remove with install.py --uninstall)\n')

#: (label, file in sd-scripts, function, required parameters, text its source must contain)
PATCH_POINTS = [
    ("train_util.add_training_arguments", "library/train_util.py", "add_training_arguments", ("parser",), None),
    ("train_util.read_config_from_file", "library/train_util.py", "read_config_from_file", ("args", "parser"), None),
    ("train_util.verify_training_args", "library/train_util.py", "verify_training_args", ("args",), None),
    ("train_util.get_sai_model_spec", "library/train_util.py", "get_sai_model_spec", ("args",), None),
    ("train_util.get_noise_noisy_latents_and_timesteps", "library/train_util.py",
     "get_noise_noisy_latents_and_timesteps", ("args", "noise_scheduler", "latents"), "randn_like(latents"),
    ("flux_train_utils.get_noisy_model_input_and_timesteps", "library/flux_train_utils.py",
     "get_noisy_model_input_and_timesteps", ("latents", "noise"), None),
    ("sd3_train_utils.get_noisy_model_input_and_timesteps", "library/sd3_train_utils.py",
     "get_noisy_model_input_and_timesteps", ("latents", "noise"), None),
    ("lumina_train_util.get_noisy_model_input_and_timesteps", "library/lumina_train_util.py",
     "get_noisy_model_input_and_timesteps", ("latents", "noise"), None),
    ("train_control_net.train (inline noise)", "train_control_net.py", "train", (), "torch.randn_like(latents"),
]

_PROBE = r"""
import json, sys
out = {"python": sys.executable, "version": sys.version.split()[0]}
import sysconfig
out["site_packages"] = sysconfig.get_paths()["purelib"]
try:
    import kohya_patch, kohya_patch.hook as h
    out["kohya_patch"] = kohya_patch.__file__
    out["hook_active"] = h.installed()
except Exception as e:
    out["kohya_patch"] = None
    out["hook_active"] = False
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


def _say(msg: str) -> None:
    print(f"[immiscible sd-scripts] {msg}")


def probe(python: str) -> dict:
    """What the target interpreter sees (site-packages, pack location, hook, dist, torch)."""
    res = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, cwd="/")
    for line in res.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"cannot run {python}: {res.stderr.strip()[-500:]}")


def _from_this_pack(path: str | None) -> bool:
    return bool(path) and Path(path).resolve().is_relative_to(PACK_DIR)


# --------------------------------------------------------------------------- sd-scripts inspection


def _function(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    return None


def patch_point_report(sd_scripts: Path) -> list[tuple[str, bool, str]]:
    """``(label, found, detail)`` per patch point, read statically (nothing is imported)."""
    rows, trees = [], {}
    for label, rel, func, params, needle in PATCH_POINTS:
        path = sd_scripts / rel
        if rel not in trees:
            try:
                src = path.read_text(encoding="utf-8")
                trees[rel] = (src, ast.parse(src))
            except (OSError, SyntaxError) as exc:
                trees[rel] = (None, exc)
        src, tree = trees[rel]
        if src is None:
            rows.append((label, False, f"{rel}: {tree}"))
            continue
        node = _function(tree, func)
        if node is None:
            rows.append((label, False, f"{rel}: no function {func}"))
            continue
        names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
        missing = [p for p in params if p not in names]
        if missing:
            rows.append((label, False, f"{rel}:{node.lineno}: parameters {missing} missing"))
        elif needle and needle not in (ast.get_source_segment(src, node) or ""):
            rows.append((label, False, f"{rel}:{node.lineno}: no `{needle}` in the body"))
        else:
            rows.append((label, True, f"{rel}:{node.lineno}"))
    return rows


def sd_scripts_version(sd_scripts: Path) -> str:
    try:
        res = subprocess.run(["git", "-C", str(sd_scripts), "describe", "--tags", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=20)
        head = subprocess.run(["git", "-C", str(sd_scripts), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if res.returncode == 0 and head.returncode == 0:
            return f"{res.stdout.strip()} (commit {head.stdout.strip()})"
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (not a git checkout)"


def upstream_knn_noise(sd_scripts: Path) -> bool:
    try:
        return "--knn_noise_k" in (sd_scripts / "library/train_util.py").read_text(encoding="utf-8")
    except OSError:
        return False


# --------------------------------------------------------------------------- actions


def _pip(python: str, *args: str) -> int:
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    _say("$ " + " ".join(cmd))
    return subprocess.run(cmd).returncode


def install_hook(sd_scripts: Path, python: str) -> int:
    info = probe(python)
    site = Path(info["site_packages"])
    marker = site / MARKER_NAME
    record = json.loads(marker.read_text()) if marker.exists() else {}
    if _from_this_pack(info["kohya_patch"]):
        _say(f"pack already importable in {python}: {info['kohya_patch']}")
    elif info["kohya_patch"]:
        _say(f"ERROR: {python} already imports another copy of kohya_patch: {info['kohya_patch']}")
        return 1
    else:
        rc = _pip(python, "install", "--no-deps", "--no-build-isolation", "-e", str(PACK_DIR))
        if rc:
            _say(f"ERROR: pip install -e {PACK_DIR} failed (exit {rc})")
            return rc
        record["pip_installed"] = True
    pth = site / PTH_NAME
    if not pth.exists() or pth.read_text() != PTH_LINE:
        pth.write_text(PTH_LINE)
        _say(f"wrote start-up hook {pth}")
    else:
        _say(f"start-up hook present: {pth}")
    record.update(pack=str(PACK_DIR), sd_scripts=str(sd_scripts), python=python)
    marker.write_text(json.dumps(record, indent=1) + "\n")
    return report(sd_scripts, python)


def uninstall_hook(python: str) -> int:
    info = probe(python)
    site = Path(info["site_packages"])
    marker = site / MARKER_NAME
    record = json.loads(marker.read_text()) if marker.exists() else {}
    pth = site / PTH_NAME
    if pth.exists():
        pth.unlink()
        _say(f"removed {pth}")
    rc = 0
    if record.get("pip_installed") and info["dist"]:
        rc = _pip(python, "uninstall", "-y", DIST_NAME)
    elif info["dist"]:
        _say(f"{DIST_NAME} {info['dist']} was installed before this installer ran; left in place")
    if marker.exists():
        marker.unlink()
    _say("uninstalled (nothing inside sd-scripts was ever changed)")
    return rc


def report(sd_scripts: Path | None, python: str) -> int:
    info = probe(python)
    ok = True
    _say(f"python: {info['python']} (Python {info['version']}, torch {info['torch']})")
    if info["kohya_patch"]:
        _say(f"pack: {DIST_NAME} {info['dist'] or '(not pip-installed)'} -> {info['kohya_patch']}")
    else:
        _say("pack: NOT importable in this environment")
        ok = False
    pth = Path(info["site_packages"]) / PTH_NAME
    _say(f"start-up hook: {pth} {'present' if pth.exists() else 'MISSING'}, "
         f"{'active' if info['hook_active'] else 'NOT active'} at interpreter start-up")
    ok &= bool(pth.exists() and info["hook_active"])
    if sd_scripts is None:
        marker = Path(info["site_packages"]) / MARKER_NAME
        if marker.exists():
            sd_scripts = Path(json.loads(marker.read_text()).get("sd_scripts", "")) or None
    if sd_scripts is None or not (sd_scripts / "library" / "train_util.py").exists():
        _say(f"sd-scripts: {'not given' if sd_scripts is None else f'no checkout at {sd_scripts}'}")
        return 0 if ok else 1
    _say(f"sd-scripts: {sd_scripts}, version {sd_scripts_version(sd_scripts)}")
    _say(f"upstream --knn_noise_k (PR #2374): {'present' if upstream_knn_noise(sd_scripts) else 'absent'}")
    for label, found, detail in patch_point_report(sd_scripts):
        _say(f"  {'ok     ' if found else 'MISSING'} {label}  [{detail}]")
        ok &= found
    _say("all good" if ok else "problems found (see above)")
    return 0 if ok else 1


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
