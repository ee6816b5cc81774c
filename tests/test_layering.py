"""The layering docs/architecture.md draws: adapters -> core, never back, never across.

Parses every module's imports, lazy ones inside functions included (no import is executed), so
a violation fails here before it can ship, whatever the test environment has installed.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: package -> the project packages it may import (besides itself). Host programs' own modules
#: (sd-scripts' ``library``, ComfyUI's ``comfy``/``comfy_api``, ``accelerate``) are named too.
ALLOWED = {
    "immiscible": set(),
    "immiscible_lab": {"immiscible"},
    "immiscible_host": {"immiscible"},
    "kohya_patch": {"immiscible", "immiscible_host"},
    "musubi_patch": {"immiscible", "immiscible_host"},
    "comfy_nodes": {"immiscible", "comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths"},
}
PROJECT = set(ALLOWED)
HOSTS = {"library", "comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths", "accelerate", "musubi_tuner"}
#: The one deliberate exception: ``python -m immiscible demo`` forwards to the lab when it runs.
EXEMPT = {"immiscible/__main__.py"}


def _modules(package: str):
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path, package: str = "", root: Path = ROOT):
    """``(line, top-level name, full dotted name, imported names)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel_parts = path.relative_to(root).with_suffix("").parts
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0], alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(rel_parts[:-1])
                base = base[: len(base) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            yield node.lineno, full.split(".")[0], full, tuple(a.name for a in node.names)


def _packages():
    return [p for p in ALLOWED if (ROOT / p).is_dir()]


@pytest.mark.parametrize("package", _packages())
def test_imports_follow_the_layering(package):
    bad = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXEMPT:
            continue
        for line, top, full, _ in _imports(path, package):
            if top == package:
                continue
            if (top in PROJECT or top in HOSTS) and top not in ALLOWED[package]:
                if package == "kohya_patch" and top in {"library", "accelerate"}:
                    continue  # the sd-scripts adapter patches sd-scripts' own modules
                if package in {"immiscible_host", "musubi_patch"} and top == "accelerate":
                    continue  # trackers are accelerate's
                if package == "musubi_patch" and top == "musubi_tuner":
                    continue
                bad.append(f"{rel}:{line} imports {full}")
    assert not bad, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of the project'}:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", [p for p in _packages() if p != "immiscible"])
def test_no_package_reaches_into_the_core_privately(package):
    bad = []
    for path in _modules(package):
        for line, top, full, names in _imports(path, package):
            if top != "immiscible":
                continue
            private = [part for part in full.split(".")[1:] if part.startswith("_")]
            private += [n for n in names if n.startswith("_")]
            if private:
                bad.append(f"{path.relative_to(ROOT).as_posix()}:{line} imports {full} {private}")
    assert not bad, "adapters use the core's public API only:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: a core module importing an adapter, lazily and privately, is seen."""
    pkg = tmp_path / "immiscible"
    pkg.mkdir()
    (pkg / "bad.py").write_text("def f():\n    from kohya_patch import hook\nfrom ._private import x\n")
    found = {full for _, _, full, _ in _imports(pkg / "bad.py", root=tmp_path)}
    assert found == {"kohya_patch", "immiscible._private"}


@pytest.mark.parametrize("package", [p for p in _packages() if p not in ("immiscible", "immiscible_lab")])
def test_adapters_do_not_copy_the_core_vocabulary(package):
    """Ranges and choices come from ``immiscible`` (K_MAX, MODES, ...), never as copied literals."""
    import immiscible

    numbers = {immiscible.K_MAX, immiscible.SAMPLE_ID_MAX}
    choices = {tuple(immiscible.MODES), tuple(immiscible.METRICS), tuple(immiscible.BACKENDS)}
    bad = []
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in numbers:
                bad.append(f"{path.name}:{node.lineno} literal {node.value}")
            elif isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                if tuple(e.value for e in node.elts) in choices:
                    bad.append(f"{path.name}:{node.lineno} literal {tuple(e.value for e in node.elts)}")
    assert not bad, f"{package} copies the core's vocabulary:\n" + "\n".join(bad)
