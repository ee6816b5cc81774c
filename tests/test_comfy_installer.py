"""comfy_nodes.installer against a fake ComfyUI folder and a fake python (no pip runs)."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from comfy_nodes import installer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def comfy(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("")
    return root


@pytest.fixture
def fake_python(tmp_path):
    """A 'python' whose environment lacks nothing, except what MISSING names; pip calls are logged."""
    log = tmp_path / "pip.log"
    script = tmp_path / "python"
    script.write_text(f"""#!{sys.executable}
import os, sys
if sys.argv[1:3] == ["-m", "pip"]:
    open({str(log)!r}, "a").write(" ".join(sys.argv[3:]) + "\\n")
    sys.exit(0)
for name in os.environ.get("MISSING", "").split():
    print(name)
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), log


def test_requirement_names():
    assert set(installer.requirement_names()) >= {"numpy", "matplotlib", "scipy"}


def test_link_install_is_idempotent_and_uninstall_undoes(comfy, fake_python):
    py, log = fake_python
    target = comfy / "custom_nodes" / installer.LINK_NAME
    assert installer.main(comfyui=str(comfy), python=py) == 0
    assert target.is_symlink() and Path(os.path.realpath(target)) == REPO
    assert installer.main(comfyui=str(comfy), python=py) == 0
    assert target.is_symlink()
    assert installer.main(comfyui=str(comfy), python=py, check=True) == 0
    assert not log.exists()  # nothing missing, so pip never ran
    assert installer.main(comfyui=str(comfy), python=py, uninstall=True) == 0
    assert not target.exists() and not target.is_symlink()
    assert installer.main(comfyui=str(comfy), python=py, uninstall=True) == 0
    assert installer.main(comfyui=str(comfy), python=py, check=True) == 1


def test_copy_install_replaces_link_and_skips_junk(comfy, fake_python):
    py, _ = fake_python
    target = comfy / "custom_nodes" / installer.LINK_NAME
    installer.main(comfyui=str(comfy), python=py)
    assert installer.main(comfyui=str(comfy), python=py, copy=True) == 0
    assert target.is_dir() and not target.is_symlink()
    assert (target / "__init__.py").exists() and (target / "immiscible" / "select.py").exists()
    assert not (target / ".git").exists() and not (target / ".venv").exists()
    assert installer.main(comfyui=str(comfy), python=py, copy=True) == 0  # refresh
    assert installer.main(comfyui=str(comfy), python=py, uninstall=True) == 0
    assert not target.exists()


def test_foreign_folder_is_left_alone(comfy, fake_python):
    py, _ = fake_python
    foreign = comfy / "custom_nodes" / installer.LINK_NAME
    foreign.mkdir()
    assert installer.main(comfyui=str(comfy), python=py) == 1
    assert installer.main(comfyui=str(comfy), python=py, uninstall=True) == 1
    assert foreign.is_dir()


def test_missing_requirements_are_installed(fake_python, monkeypatch):
    py, log = fake_python
    monkeypatch.setenv("MISSING", "scipy")
    assert installer.main(python=py, check=True) == 1   # check only reports
    assert not log.exists()
    assert installer.main(python=py) == 0               # ComfyUI-Manager case: requirements only
    assert "install -r" in log.read_text() and "requirements.txt" in log.read_text()


def test_not_comfyui(tmp_path, fake_python):
    assert installer.main(comfyui=str(tmp_path), python=fake_python[0]) == 1


def test_finds_comfyui_venv(comfy):
    (comfy / "venv" / "bin").mkdir(parents=True)
    (comfy / "venv" / "bin" / "python").write_text("")
    assert installer.find_python(comfy, None) == str(comfy / "venv" / "bin" / "python")
    assert installer.find_python(comfy, "/x/python") == "/x/python"


# --------------------------------------------------------------------------- failures leave custom_nodes as it was


def _entries(comfy):
    return sorted(p.name for p in (comfy / "custom_nodes").iterdir())


def test_bad_python_installs_nothing(comfy, tmp_path):
    """A --python that does not run failed after the link was made, and the link stayed."""
    assert installer.main(comfyui=str(comfy), python=str(tmp_path / "no" / "python")) == 1
    assert _entries(comfy) == []
    assert installer.main(comfyui=str(comfy), python=str(tmp_path / "no" / "python"), copy=True) == 1
    assert _entries(comfy) == []


@pytest.fixture
def failing_pip(tmp_path):
    """A python that runs but whose pip fails (MISSING lists a requirement, so pip is called)."""
    script = tmp_path / "python_failing_pip"
    script.write_text(f"""#!{sys.executable}
import sys
if sys.argv[1:3] == ["-m", "pip"]:
    sys.exit(3)
print("scipy")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.mark.parametrize("copy", [False, True])
def test_failing_requirements_roll_the_install_back(comfy, failing_pip, copy):
    assert installer.main(comfyui=str(comfy), python=failing_pip, copy=copy) != 0
    assert _entries(comfy) == []


@pytest.mark.parametrize("before, copy", [("link", True), ("copy", True), ("copy", False)])
def test_failed_reinstall_puts_the_previous_install_back(comfy, fake_python, failing_pip, before, copy):
    py, _ = fake_python
    target = comfy / "custom_nodes" / installer.LINK_NAME
    assert installer.main(comfyui=str(comfy), python=py, copy=before == "copy") == 0
    if before == "copy":
        (target / "sentinel").write_text("the previous copy")
    assert installer.main(comfyui=str(comfy), python=failing_pip, copy=copy) != 0
    assert _entries(comfy) == [installer.LINK_NAME]
    if before == "link":
        assert target.is_symlink() and Path(os.path.realpath(target)) == REPO
    else:
        assert not target.is_symlink() and (target / "sentinel").read_text() == "the previous copy"


def test_interrupt_during_pip_rolls_back_and_propagates(comfy, fake_python, monkeypatch):
    py, _ = fake_python

    def interrupted(python, check=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(installer, "ensure_requirements", interrupted)
    with pytest.raises(KeyboardInterrupt):
        installer.main(comfyui=str(comfy), python=py, copy=True)
    assert _entries(comfy) == []


def test_copy_failing_midway_leaves_nothing(comfy, fake_python, monkeypatch):
    """A half copy used to land at the target without its marker: 'not made by this installer' forever."""
    py, _ = fake_python
    real = installer.shutil.copytree

    def half_copy(src, dst, **kw):
        real(REPO / "comfy_nodes", Path(dst) / "comfy_nodes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(installer.shutil, "copytree", half_copy)
    with pytest.raises(OSError, match="No space"):
        installer.main(comfyui=str(comfy), python=py, copy=True)
    assert _entries(comfy) == []


def test_marker_and_link_are_written_through_os_replace(comfy, fake_python, monkeypatch):
    py, _ = fake_python
    replaced = []
    real = os.replace
    monkeypatch.setattr(installer.os, "replace", lambda a, b: replaced.append((Path(a).name, Path(b).name)) or real(a, b))
    assert installer.main(comfyui=str(comfy), python=py, copy=True) == 0
    assert (f".{installer.MARKER}.tmp-{os.getpid()}", installer.MARKER) in replaced
    assert installer.main(comfyui=str(comfy), python=py) == 0
    assert (f".{installer.LINK_NAME}.tmp-{os.getpid()}", installer.LINK_NAME) in replaced
    target = comfy / "custom_nodes" / installer.LINK_NAME
    assert target.is_symlink() and _entries(comfy) == [installer.LINK_NAME]


# --------------------------------------------------------------------------- a damaged marker


def _damage(marker: Path, how: str) -> None:
    marker.unlink()
    if how == "empty":
        marker.write_text("")
    elif how == "binary":
        marker.write_bytes(b"\xff\xfe\x00garbage")
    elif how == "foreign text":
        marker.write_text('{"json": "not ours"}')
    elif how == "unreadable":
        marker.mkdir()  # reading it fails with an OSError, even as root


@pytest.mark.parametrize("how, problem", [("empty", "empty"), ("binary", "corrupt (not text)"),
                                          ("foreign text", "corrupt (expected 'copied from PATH'"),
                                          ("unreadable", "unreadable")])
def test_damaged_marker_is_reported_and_recovered_from(comfy, fake_python, capsys, how, problem):
    py, _ = fake_python
    target = comfy / "custom_nodes" / installer.LINK_NAME
    marker = target / installer.MARKER
    assert installer.main(comfyui=str(comfy), python=py, copy=True) == 0
    _damage(marker, how)
    capsys.readouterr()
    assert installer.main(comfyui=str(comfy), python=py, check=True) == 1
    out = capsys.readouterr().out
    assert f"its marker {marker} is {problem}" in out and "--copy rewrites it" in out
    assert installer.main(comfyui=str(comfy), python=py, copy=True) == 0   # install recovers: a fresh copy
    assert installer.marker_problem(marker) is None
    assert installer.main(comfyui=str(comfy), python=py, check=True) == 0
    _damage(marker, how)
    assert installer.main(comfyui=str(comfy), python=py, uninstall=True) == 0   # and so does uninstall
    assert _entries(comfy) == []


def test_leftovers_of_a_killed_run_are_reported_and_recovered(comfy, fake_python, capsys):
    """A run killed between moving the old install aside and placing the new one left no install at all."""
    py, _ = fake_python
    dead = 2**22 + 12345  # above pid_max's default, so no process has it
    assert installer.main(comfyui=str(comfy), python=py, copy=True) == 0
    cn = comfy / "custom_nodes"
    os.rename(cn / installer.LINK_NAME, cn / f".{installer.LINK_NAME}.old-{dead}.disabled")
    (cn / f".{installer.LINK_NAME}.new-{dead}.disabled").mkdir()
    capsys.readouterr()
    assert installer.main(comfyui=str(comfy), python=py, check=True) == 1
    out = capsys.readouterr().out
    assert f".{installer.LINK_NAME}.old-{dead}.disabled: left by an interrupted run" in out
    assert installer.main(comfyui=str(comfy), python=py, copy=True) == 0
    assert _entries(comfy) == [installer.LINK_NAME] and installer.main(comfyui=str(comfy), python=py, check=True) == 0
