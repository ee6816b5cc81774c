"""install.py sends each flag combination to the right installer(s)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def install(monkeypatch):
    from comfy_nodes import installer as comfy_installer
    from immiscible_host import installer

    calls = []
    monkeypatch.setattr(installer, "main", lambda host, root, **kw: calls.append((host.name, kw)) or 0)
    monkeypatch.setattr(comfy_installer, "main", lambda **kw: calls.append(("comfyui", kw)) or 0)
    spec = importlib.util.spec_from_file_location("immiscible_install_script", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main, calls


@pytest.mark.parametrize("argv,targets", [
    ([], ["comfyui"]),                                                  # ComfyUI-Manager: requirements only
    (["--sd-scripts", "/sd"], ["sd-scripts"]),
    (["--comfyui", "/c"], ["comfyui"]),
    (["--sd-scripts", "/sd", "--comfyui", "/c"], ["sd-scripts", "comfyui"]),
    (["--check"], ["sd-scripts"]),
    (["--check", "--comfyui", "/c"], ["comfyui"]),
    (["--uninstall", "--python", "/venv/bin/python"], ["sd-scripts"]),  # the hook lives in that venv
    (["--uninstall", "--comfyui", "/c"], ["comfyui"]),
    (["--musubi-tuner", "/m"], ["musubi-tuner"]),
    (["--musubi-tuner", "/m", "--sd-scripts", "/sd"], ["musubi-tuner", "sd-scripts"]),
])
def test_flags_reach_the_right_installers(install, argv, targets):
    main, calls = install
    assert main(argv) == 0
    assert [name for name, _ in calls] == targets
    for name, kw in calls:
        assert kw["check"] == ("--check" in argv) and kw["uninstall"] == ("--uninstall" in argv)
        if name == "sd-scripts" and "--python" in argv:
            assert kw["python"] == "/venv/bin/python"


def test_a_failing_installer_fails_the_command(install, monkeypatch):
    from immiscible_host import installer

    main, _ = install
    monkeypatch.setattr(installer, "main", lambda host, root, **kw: 1)
    assert main(["--sd-scripts", "/sd"]) == 1
