"""The musubi-tuner installer: dispatch from install.py, the static --check on a fake checkout, and
the shared-environment rule of immiscible_host.envinstall (no venv is touched here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from immiscible_host import envinstall
from musubi_patch import installer, points

_spec = importlib.util.spec_from_file_location("immiscible_install_script_musubi",
                                               Path(__file__).resolve().parent.parent / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(installer, "main", lambda **kw: calls.append(("musubi", kw)) or 0)
    import kohya_patch.installer as kohya

    monkeypatch.setattr(kohya, "main", lambda **kw: calls.append(("kohya", kw)) or 0)
    assert install.main(["--musubi-tuner", "/m", "--python", "/p", "--uninstall"]) == 0
    assert calls == [("musubi", {"musubi_tuner": "/m", "python": "/p", "check": False, "uninstall": True})]
    calls.clear()
    install.main(["--check", "--python", "/p"])        # no folder: the sd-scripts environment, as before
    assert [c[0] for c in calls] == ["kohya"]


def test_static_check_on_a_fake_checkout(tmp_path):
    src = tmp_path / "src/musubi_tuner"
    (src / "training").mkdir(parents=True)
    (src / "training/trainer_base.py").write_text(
        "class NetworkTrainer:\n    def _run_training_loop(self):\n        noise = torch.randn_like(latents)\n")
    (src / "training/parser_common.py").write_text("def _add_training_args(parser): pass\n")
    (src / "wan_train_network.py").write_text("")
    (src / "my_new_train_network.py").write_text("")
    rows = dict(installer.patch_point_report(tmp_path))
    assert rows[points.BASE_LOOP.name].ok and rows["parser_common._add_training_args"].ok
    assert rows["parser_common.read_config_from_file"].state == "broken"
    assert rows["hv_train.setup_parser"].state == "absent"
    trainers = {s: (what, bad) for s, what, bad in installer.trainer_report(tmp_path, rows)}
    assert "selects through trainer_base" in trainers["wan_train_network.py"][0]
    assert "not a trainer this pack knows" in trainers["my_new_train_network.py"][0]


def test_other_hooks_keep_the_pack(tmp_path):
    (tmp_path / "immiscible_kohya_startup.pth").write_text("")
    (tmp_path / installer.PTH_NAME).write_text("")
    assert envinstall.other_hooks(tmp_path, installer.PTH_NAME) == ["immiscible_kohya_startup.pth"]
    assert "musubi_patch.startup" in installer.PTH_LINE and "except Exception" in installer.PTH_LINE
