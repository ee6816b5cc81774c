"""install.py --onetrainer: the flags reach the OneTrainer installer, and the static --check of a
checkout (the fake of tests/test_onetrainer_patch.py; nothing is imported or installed here)."""
from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

import pytest

from immiscible_host import installer
from onetrainer_patch.host import HOST
from test_onetrainer_patch import FAKE

ROOT = Path(__file__).resolve().parents[1]


def _checkout(tmp_path, **replace):
    for rel, src in FAKE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        src = textwrap.dedent(src)
        for old, new in replace.get(rel, ()):
            src = src.replace(old, new)
        path.write_text(src)
    (tmp_path / "scripts").mkdir()
    for name in ("train.py", "train_ui.py", "train_ui_qt.py"):
        (tmp_path / "scripts" / name).write_text("")
    return tmp_path


def test_static_check_of_a_checkout(tmp_path):
    root = _checkout(tmp_path)
    assert HOST.is_checkout(root)
    rows = dict(installer.patch_point_report(HOST, root))
    assert all(status.ok for status in rows.values()), rows
    assert str(rows["BaseTrainingTabView.__create_noise_frame"]) == "ok"   # found under its mangled name
    trainers = {s: (what, bad) for s, what, bad in installer.trainer_report(HOST, root, rows)}
    assert set(trainers) == {"train.py", "train_ui.py", "train_ui_qt.py"}
    assert all("selects through ModelSetupNoiseMixin._create_noise" in what for what, _ in trainers.values())
    assert HOST.notes(root) == ["own noise selection (k_noise_sampling, PR #1260): absent"]


def test_a_checkout_whose_noise_mixin_drew_otherwise_is_broken(tmp_path):
    rel = "modules/modelSetup/mixin/ModelSetupNoiseMixin.py"
    root = _checkout(tmp_path, **{rel: [("torch.randn(", "torch.normal(")]})
    rows = dict(installer.patch_point_report(HOST, root))
    assert rows["ModelSetupNoiseMixin._create_noise"].state == "broken"
    assert "torch.randn(" in rows["ModelSetupNoiseMixin._create_noise"].detail
    trainers = installer.trainer_report(HOST, root, rows)
    assert all(bad and "refuses" in what for _, what, bad in trainers)


@pytest.mark.parametrize("argv,targets", [
    (["--onetrainer", "/ot"], ["OneTrainer"]),
    (["--onetrainer", "/ot", "--check"], ["OneTrainer"]),
    (["--onetrainer", "/ot", "--uninstall"], ["OneTrainer"]),
    (["--onetrainer", "/ot", "--sd-scripts", "/sd"], ["OneTrainer", "sd-scripts"]),
])
def test_install_py_sends_onetrainer_to_its_installer(monkeypatch, argv, targets):
    calls = []
    monkeypatch.setattr(installer, "main", lambda host, root, **kw: calls.append((host.name, root, kw)) or 0)
    spec = importlib.util.spec_from_file_location("immiscible_install_script_ot", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    assert [name for name, _, _ in calls] == targets
    name, root, kw = calls[0]
    assert root == "/ot" and kw["check"] == ("--check" in argv) and kw["uninstall"] == ("--uninstall" in argv)


def test_the_start_up_hook_imports_no_torch():
    """The .pth line runs in every interpreter of OneTrainer's venv: the hook and its table import no torch."""
    import os
    import subprocess
    import sys

    code = ("import sys, onetrainer_patch.startup as s; assert s.ADAPTER.hook.installed(); "
            "print(sorted(m for m in ('torch', 'numpy', 'immiscible') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
