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
