"""The layering docs/architecture.md draws, checked on the import graph of every project file.

:func:`check` reads every ``.py`` file under a root (``install.py`` and the root ``__init__.py``
included; ``.venv`` and other hidden or build folders skipped), parses its imports without running
anything (lazy ones inside functions included, relative ones resolved, ``importlib.import_module`` /
``__import__`` with a string literal followed like an import) and returns what breaks these rules:

- the core (``immiscible``) imports nothing of the project and no host program;
- the kit (``immiscible_host``, shared by the training-program adapters) imports only the core,
  torch, numpy and the standard library: no adapter, no lab, no host program;
- adapters import the core (public names only: no ``_private`` module or name), the kit (``comfy_nodes``
  too, for the ``ss_immiscible_*`` metadata and the draw-seeded selection of its training node) and
  their own host program; never each other, never the lab;
- the lab imports only the core; nothing outside the lab imports the lab (tests and the Makefile may);
- ``accelerate``: nothing of the core, kit, adapters, lab or entries imports it at module level.
  The one lazy import (inside a function) allowed is in the module that wraps trackers
  (``TRACKER_MODULE``). Today nothing imports it at all: the patch-point tables name it by module
  name and ``patching.py`` imports it (the allowlisted dynamic import below) when the trainer's
  module that uses it loads;
- no import cycle among project modules at module level (a lazy import runs after both modules
  have loaded, so it cannot form one);
- a dynamic import whose argument is not a string literal is allowed only at ``DYNAMIC_IMPORT_SITES``
  (each imports a *host program* module), and no string names a project function to be imported
  later (``"package.module:function"``, or its prefix ``"package.module:"``): a wrapper is
  referenced by an import the graph can see.

Tests may import anything and are not checked; ``scripts/`` (fixtures run inside host
environments) may import host programs and adapters, not the lab. The entries ``install.py`` and
the root ``__init__.py`` (ComfyUI's) import adapters, never the lab.
"""
from __future__ import annotations

import ast
import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the rules, as data
# Package names live here only, so a rename (immiscible_host -> immiscible_kit) is one edit.
CORE = "immiscible"
KIT = "immiscible_host"
TRAINING_ADAPTERS = ("kohya_patch", "musubi_patch", "onetrainer_patch")
ADAPTERS = (*TRAINING_ADAPTERS, "comfy_nodes")
LAB = "immiscible_lab"
INSTALLER = "install"          # install.py
COMFY_ENTRY = "__init__"       # the root __init__.py, ComfyUI's entry to the node pack
SCRIPTS = "scripts"            # fixtures and checks run inside host environments
TESTS = "tests"                # may import anything; not checked
BENCHMARKS = "benchmarks"      # benchmark scripts: the core only, like the lab
PROJECT = (CORE, KIT, *ADAPTERS, LAB, INSTALLER, COMFY_ENTRY, SCRIPTS)

#: Layer -> the project layers it may import, besides itself.
MAY_IMPORT = {
    CORE: (),
    KIT: (CORE,),
    **{a: (CORE, KIT) for a in TRAINING_ADAPTERS},
    "comfy_nodes": (CORE, KIT),
    LAB: (CORE,),
    INSTALLER: (CORE, KIT, *ADAPTERS),
    COMFY_ENTRY: ("comfy_nodes",),
    SCRIPTS: (CORE, KIT, *ADAPTERS, INSTALLER),
    BENCHMARKS: (CORE,),
}
#: Host programs' modules (top-level names).
HOST_MODULES = ("library", "musubi_tuner", "comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths",
                "accelerate", "modules")
#: Layer -> the host modules it may import (``accelerate`` is ruled separately, see the docstring).
MAY_USE_HOST = {
    "kohya_patch": ("library",),
    "musubi_patch": ("musubi_tuner",),
    "onetrainer_patch": ("modules",),
    "comfy_nodes": ("comfy", "comfy_api", "comfy_extras", "nodes", "folder_paths"),
    SCRIPTS: HOST_MODULES,
}
#: Layer -> the only third-party packages it may import (layers not named here are not limited).
THIRD_PARTY = {KIT: ("torch", "numpy")}
ACCELERATE = "accelerate"
#: The module that wraps accelerate's trackers: the only place accelerate may be imported, lazily.
TRACKER_MODULE = f"{KIT}/telemetry.py"
#: ``(file, enclosing function)`` where a dynamic import with a computed name is allowed: each
#: imports a host program's module, named by a patch-point table or a command line.
DYNAMIC_IMPORT_SITES = {
    (f"{KIT}/patching.py", "patch_module"),                   # point.module: the host module a point names
    ("musubi_patch/run.py", "_run"),                          # "musubi_tuner." + the script's name
    ("scripts/fixtures/kohya_gui_command.py", "_stub"),       # the kohya_ss GUI's optional gradio/tkinter
}
SKIP_DIRS = {".venv", "venv", "build", "dist", "node_modules", "__pycache__"}
_DYNAMIC_IMPORTERS = {"import_module", "__import__"}


# --------------------------------------------------------------------------- the checker


@dataclass(frozen=True)
class Import:
    path: str           # the importing file, relative to the root
    line: int
    target: str         # absolute dotted module name
    names: tuple = ()   # what ``from target import ...`` takes
    lazy: bool = False  # inside a function


@dataclass(frozen=True)
class Violation:
    rule: str
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


def project_files(root: Path) -> list[PurePosixPath]:
    """Every ``.py`` file under ``root`` (relative), hidden, virtual-env and build folders left out."""
    out = []
    for path in root.rglob("*.py"):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if any(p in SKIP_DIRS or p.startswith(".") or p.endswith(".egg-info") for p in rel.parts[:-1]):
            continue
        out.append(rel)
    return sorted(out)


def module_name(rel: PurePosixPath) -> str:
    """``a/b/c.py`` -> ``a.b.c``; ``a/__init__.py`` -> ``a``; the root ``__init__.py`` -> ``__init__``."""
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _package(rel: PurePosixPath) -> tuple[str, ...]:
    """The package a relative import in ``rel`` starts from (the root's ``__init__.py``: the root, ())."""
    return rel.parts[:-1]


def layer_of(rel: PurePosixPath) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


class _Reader(ast.NodeVisitor):
    """Imports, computed dynamic imports and string references of one file, with their scope."""

    def __init__(self, rel: PurePosixPath):
        self.rel, self.scope, self.functions = rel, [], 0
        self.imports: list[Import] = []
        self.computed: list[tuple[int, str]] = []     # (line, enclosing function) of import_module(<expr>)
        self.strings: list[tuple[int, str]] = []      # (line, "package.module:function")

    def _add(self, node, target: str, names=()):
        self.imports.append(Import(self.rel.as_posix(), node.lineno, target, tuple(names), self.functions > 0))

    def _scoped(self, node, function: bool):
        self.scope.append(node.name if hasattr(node, "name") else "<lambda>")
        self.functions += function
        self.generic_visit(node)
        self.functions -= function
        self.scope.pop()

    def visit_FunctionDef(self, node):
        self._scoped(node, True)

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._scoped(node, False)

    def visit_Import(self, node):
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node):
        if node.level:
            base = _package(self.rel)
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *([node.module] if node.module else [])])
        else:
            target = node.module or ""
        self._add(node, target, (a.name for a in node.names))

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in _DYNAMIC_IMPORTERS and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(node, arg.value)
            else:
                self.computed.append((node.lineno, self.scope[-1] if self.scope else "<module>"))
        self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, str) and _STRING_REFERENCE.match(node.value):
            self.strings.append((node.lineno, node.value))


_STRING_REFERENCE = re.compile(rf"^(?:{'|'.join(map(re.escape, PROJECT))})(?:\.\w+)*:\w*$")


def read(root: Path, rel: PurePosixPath) -> _Reader:
    reader = _Reader(rel)
    reader.visit(ast.parse((root / rel).read_text(encoding="utf-8"), filename=str(rel)))
    return reader


def resolve(imp: Import, modules: set[str]) -> str:
    """The project module ``imp`` loads (``from pkg import sub`` -> ``pkg.sub``), else its target."""
    for name in imp.names:
        if f"{imp.target}.{name}" in modules:
            return f"{imp.target}.{name}"
    parts = imp.target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return imp.target


def _rule_for_import(layer: str, imp: Import, top: str) -> tuple[str, str] | None:
    """``(rule, message)`` when a file of ``layer`` may not make ``imp`` (top-level name ``top``)."""
    if top in MAY_USE_HOST.get(layer, ()):
        return None
    if top == ACCELERATE:
        if not imp.lazy:
            return "accelerate", "imports accelerate at module level"
        if imp.path == TRACKER_MODULE:
            return None
        return "accelerate", f"imports accelerate outside {TRACKER_MODULE}"
    if top in HOST_MODULES:
        return "host", f"{layer} imports the host program module {imp.target}"
    if top in PROJECT and top != layer:
        if top not in MAY_IMPORT[layer]:
            allowed = ", ".join(MAY_IMPORT[layer]) or "nothing of the project"
            return "layer", f"{layer} imports {imp.target} (it may import {allowed})"
        if top == CORE:
            private = [p for p in imp.target.split(".")[1:] if p.startswith("_")]
            private += [n for n in imp.names if n.startswith("_")]
            if private:
                return "private", f"imports the core's private {', '.join(private)} ({imp.target})"
        return None
    limited = THIRD_PARTY.get(layer)
    if limited is not None and top not in PROJECT and top not in sys.stdlib_module_names and top not in limited:
        return "third-party", f"{layer} imports {top} (it may import only {', '.join(limited)} and the standard library)"
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):  # Tarjan; recursion depth is bounded by the project's module count
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_in(min(component), component, edges))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _cycle_in(start: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``component`` (breadth first)."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(edges.get(path[-1], ()) & component):
            if w == start:
                return [*path, start]
            if w not in seen:
                seen.add(w)
                paths.append([*path, w])
    raise AssertionError("a strongly connected component without a cycle")


def check(root: Path) -> list[Violation]:
    """Every violation of the module docstring's rules in the project under ``root``."""
    files = [rel for rel in project_files(root) if layer_of(rel) != TESTS]
    readers = {rel: read(root, rel) for rel in files}
    paths = {module_name(rel): rel.as_posix() for rel in files}
    modules = set(paths)
    found, edges = [], {}
    for rel, reader in readers.items():
        layer, path = layer_of(rel), rel.as_posix()
        for imp in reader.imports:
            target = resolve(imp, modules)
            rule = _rule_for_import(layer, imp, target.split(".")[0])
            if rule:
                found.append(Violation(rule[0], path, imp.line, rule[1]))
            if not imp.lazy and target in modules and target != module_name(rel):
                edges.setdefault(module_name(rel), set()).add(target)
        for line, function in reader.computed:
            if (path, function) not in DYNAMIC_IMPORT_SITES:
                found.append(Violation("dynamic-import", path, line,
                                       f"imports a computed module name in {function}() (not an allowed site)"))
        for line, text in reader.strings:
            found.append(Violation("string-reference", path, line, f"names a project function by string: {text!r}"))
    for cycle in cycles(edges):
        found.append(Violation("cycle", paths[cycle[0]], 0, "import cycle: " + " -> ".join(cycle)))
    return found


# --------------------------------------------------------------------------- the project


@functools.lru_cache(maxsize=None)
def _project_violations() -> tuple[Violation, ...]:
    return tuple(check(ROOT))


def test_the_project_keeps_its_layering():
    bad = [str(v) for v in _project_violations()]
    assert not bad, "layering violations (see tests/test_layering.py's docstring):\n" + "\n".join(bad)


def test_the_checker_reads_the_whole_project():
    names = {module_name(rel) for rel in project_files(ROOT)}
    assert {INSTALLER, COMFY_ENTRY, CORE, f"{CORE}.select", KIT, f"{LAB}.bench", *ADAPTERS} <= names
    assert not any(n.startswith(".venv") for n in names)


@pytest.mark.parametrize("package", [KIT, *ADAPTERS])
def test_adapters_do_not_copy_the_core_vocabulary(package):
    """Ranges and choices come from ``immiscible`` (K_MAX, MODES, ...), never as copied literals."""
    import immiscible

    numbers = {immiscible.K_MAX, immiscible.SAMPLE_ID_MAX}
    choices = {tuple(immiscible.MODES), tuple(immiscible.METRICS), tuple(immiscible.BACKENDS)}
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value in numbers:
                bad.append(f"{path.name}:{node.lineno} literal {node.value}")
            elif isinstance(node, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in node.elts):
                if tuple(e.value for e in node.elts) in choices:
                    bad.append(f"{path.name}:{node.lineno} literal {tuple(e.value for e in node.elts)}")
    assert not bad, f"{package} copies the core's vocabulary:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- the checker can fail

CLEAN = {
    "install.py": "from kohya_patch import installer\n",
    "__init__.py": "def entry():\n    from .comfy_nodes.nodes import x\n",
    "immiscible/__init__.py": "from .select import select_noise\n",
    "immiscible/select.py": "import torch\nfrom .checks import check_k\n",
    "immiscible/checks.py": "K_MAX = 2\n",
    f"{KIT}/__init__.py": "",
    f"{KIT}/patching.py": "import importlib\nimport numpy\nfrom immiscible import check_k\n\n"
                         "def patch_module(point):\n    return importlib.import_module(point.module)\n",
    f"{KIT}/telemetry.py": "def wrap():\n    import accelerate\n",
    "kohya_patch/__init__.py": "",
    "kohya_patch/noise.py": f"from {KIT}.patching import patch_module\nfrom immiscible import select_noise\n"
                            "import library.train_util\n",
    "kohya_patch/installer.py": "def main():\n    from .noise import patch_module\n",
    "comfy_nodes/nodes.py": "import comfy.model_management\nfrom immiscible.select import select_noise\n",
    f"{LAB}/bench.py": "import scipy\nfrom immiscible import select_noise\n",
    "tests/test_x.py": f"import {LAB}.bench\nfrom kohya_patch import noise\nimport importlib\n"
                       "importlib.import_module(name)\nW = 'kohya_patch.noise:wrap'\n",
}

PLANTED = {
    "a core module importing the lab, lazily": (
        {"immiscible/select.py": f"def f():\n    from {LAB} import bench\n"}, {("layer", "immiscible/select.py")}),
    "a core module importing a host program": (
        {"immiscible/checks.py": "import comfy\n"}, {("host", "immiscible/checks.py")}),
    "an adapter importing another adapter, relatively": (
        {"kohya_patch/noise.py": "from ..musubi_patch import support\n"}, {("layer", "kohya_patch/noise.py")}),
    "an adapter importing another adapter by a literal import_module": (
        {"kohya_patch/noise.py": "import importlib\nM = importlib.import_module('comfy_nodes.nodes')\n"},
        {("layer", "kohya_patch/noise.py")}),
    "an adapter importing another host program": (
        {"kohya_patch/noise.py": "import musubi_tuner\n"}, {("host", "kohya_patch/noise.py")}),
    "an adapter reaching into the core privately": (
        {"comfy_nodes/nodes.py": "from immiscible.select import _ranker\nfrom immiscible._x import y\n"},
        {("private", "comfy_nodes/nodes.py")}),
    "comfy_nodes importing a training adapter": (
        {"comfy_nodes/nodes.py": "from kohya_patch import noise\n"}, {("layer", "comfy_nodes/nodes.py")}),
    "the kit importing an adapter and a third-party package": (
        {f"{KIT}/patching.py": "import scipy\nfrom kohya_patch import installer\n"},
        {("third-party", f"{KIT}/patching.py"), ("layer", f"{KIT}/patching.py")}),
    "the installer importing the lab": (
        {"install.py": f"import {LAB}.bench\n"}, {("layer", "install.py")}),
    "the lab importing an adapter": (
        {f"{LAB}/bench.py": "from kohya_patch import noise\n"}, {("layer", f"{LAB}/bench.py")}),
    "a module-level accelerate import in the kit's tracker module": (
        {f"{KIT}/telemetry.py": "import accelerate\n"}, {("accelerate", f"{KIT}/telemetry.py")}),
    "a lazy accelerate import outside the tracker module": (
        {"kohya_patch/noise.py": "def f():\n    from accelerate import Accelerator\n"},
        {("accelerate", "kohya_patch/noise.py")}),
    "a module-level import cycle": (
        {f"{KIT}/a.py": "from . import b\n", f"{KIT}/b.py": f"from {KIT}.c import x\n",
         f"{KIT}/c.py": "from .a import y\n"}, {("cycle", f"{KIT}/a.py")}),
    "a string-named wrapper, whole or as a prefix": (
        {"kohya_patch/points.py": "W = 'kohya_patch.noise:wrap_sd_noise'\n",
         "musubi_patch/points.py": "_S = 'musubi_patch.support:'\nW = _S + 'wrap'\n"},
        {("string-reference", "kohya_patch/points.py"), ("string-reference", "musubi_patch/points.py")}),
    "a computed import_module outside the allowed sites": (
        {"kohya_patch/noise.py": "import importlib\n\ndef load(name):\n    return importlib.import_module(name)\n"},
        {("dynamic-import", "kohya_patch/noise.py")}),
    "a computed __import__": (
        {f"{KIT}/startup.py": "def f(n):\n    return __import__('immi' + n)\n"}, {("dynamic-import", f"{KIT}/startup.py")}),
    "a lazy back-import (no cycle: it runs after both modules loaded)": (
        {f"{KIT}/a.py": "from . import b\n", f"{KIT}/b.py": "def f():\n    from .a import y\n"}, set()),
}


def _tree(root: Path, files: dict) -> Path:
    for rel, text in {**CLEAN, **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / ".venv/lib").mkdir(parents=True)
    (root / ".venv/lib/site.py").write_text(f"import {LAB}\nimport accelerate\n")   # never read
    return root


def test_a_clean_tree_passes(tmp_path):
    assert check(_tree(tmp_path, {})) == []


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_the_checker_reports_a_planted_violation(tmp_path, case):
    files, expected = PLANTED[case]
    found = check(_tree(tmp_path, files))
    assert {(v.rule, v.path) for v in found} == expected, "\n".join(map(str, found))


def test_a_cycle_is_reported_with_its_path(tmp_path):
    files, _ = PLANTED["a module-level import cycle"]
    (cycle,) = check(_tree(tmp_path, files))
    assert cycle.message.endswith(f"{KIT}.a -> {KIT}.b -> {KIT}.c -> {KIT}.a")
