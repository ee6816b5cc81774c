"""immiscible_host.hook.ImportHook with a table of its own (no adapter involved)."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from immiscible_host.hook import ImportHook

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def host_pkg(tmp_path, monkeypatch):
    """A package ``hostpkg`` with a target module ``hostpkg.core`` (and ``hostpkg.other``)."""
    pkg = tmp_path / "hostpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("MARKER = 1\ndef f():\n    return 'f'\n")
    (pkg / "other.py").write_text("def f():\n    return 'other'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    hooks = []
    yield pkg, hooks
    for h in hooks:
        h.uninstall()
    for name in [m for m in sys.modules if m.startswith("hostpkg")]:
        del sys.modules[name]


def make_hook(hooks, name="test", targets=None, disable_env=None, fail=False):
    seen = []

    def patch(module):
        seen.append(module.__name__)
        if fail:
            raise RuntimeError("boom")
        module.f = lambda: "patched"

    hook = ImportHook(name, targets or {"hostpkg.core": "MARKER"}, patch, disable_env=disable_env)
    hooks.append(hook)
    return hook, seen


def test_patches_targets_on_import_and_nothing_else(host_pkg):
    _, hooks = host_pkg
    hook, seen = make_hook(hooks)
    assert hook.install() and hook.installed()
    import hostpkg.core
    import hostpkg.other

    assert hostpkg.core.f() == "patched" and hostpkg.other.f() == "other" and seen == ["hostpkg.core"]
    assert hook.install() and seen == ["hostpkg.core", "hostpkg.core"]  # already imported: patched again
    assert sum(isinstance(f, ImportHook) for f in sys.meta_path) == 1   # installed once


def test_a_namesake_without_the_marker_is_left_alone(host_pkg):
    pkg, hooks = host_pkg
    (pkg / "core.py").write_text("def f():\n    return 'foreign'\n")
    hook, seen = make_hook(hooks)
    hook.install()
    import hostpkg.core

    assert hostpkg.core.f() == "foreign" and seen == []


def test_a_failing_patch_never_breaks_the_import(host_pkg, caplog):
    _, hooks = host_pkg
    hook, seen = make_hook(hooks, fail=True)
    hook.install()
    with caplog.at_level("WARNING"):
        import hostpkg.core
    assert hostpkg.core.f() == "f" and seen == ["hostpkg.core"]
    assert any("patching hostpkg.core failed" in r.message for r in caplog.records)


def test_disable_env_and_two_adapters_side_by_side(host_pkg, monkeypatch):
    _, hooks = host_pkg
    monkeypatch.setenv("HOST_TEST_DISABLE", "1")
    off, _ = make_hook(hooks, name="off", disable_env="HOST_TEST_DISABLE")
    assert not off.install() and not off.installed()
    a, seen_a = make_hook(hooks, name="a")
    b, seen_b = make_hook(hooks, name="b", targets={"hostpkg.other": "f"})
    a.install()
    b.install()
    import hostpkg.core  # noqa: F401
    import hostpkg.other  # noqa: F401

    assert seen_a == ["hostpkg.core"] and seen_b == ["hostpkg.other"]
    a.uninstall()
    assert not a.installed() and b.installed()


def test_importing_the_hook_and_the_table_machinery_imports_no_torch():
    code = textwrap.dedent("""
        import sys
        import immiscible_host, immiscible_host.hook, immiscible_host.points, immiscible_host.adapter
        import kohya_patch.host, kohya_patch.startup, musubi_patch.host, musubi_patch.startup
        assert kohya_patch.host.ADAPTER.hook.installed() and musubi_patch.host.ADAPTER.hook.installed()
        print(sorted(m for m in ("torch", "numpy", "immiscible") if m in sys.modules))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
