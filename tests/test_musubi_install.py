"""The musubi-tuner installer: the static --check on a fake checkout (dispatch: test_install_dispatch.py), and
the shared-environment rule of immiscible_host.envinstall (no venv is touched here)."""
from __future__ import annotations

from immiscible_host import envinstall
from immiscible_host import installer
from musubi_patch.host import HOST

PTH_LINE = envinstall.pth_line(HOST.package, HOST.name)



def test_static_check_on_a_fake_checkout(tmp_path):
    src = tmp_path / "src/musubi_tuner"
    (src / "training").mkdir(parents=True)
    (src / "training/trainer_base.py").write_text(
        "class NetworkTrainer:\n    def _run_training_loop(self):\n        noise = torch.randn_like(latents)\n")
    (src / "training/parser_common.py").write_text("def _add_training_args(parser): pass\n")
    (src / "wan_train_network.py").write_text("")
    (src / "my_new_train_network.py").write_text("")
    rows = dict(installer.patch_point_report(HOST, tmp_path))
    assert rows[HOST.always_intercept].ok and rows["parser_common._add_training_args"].ok
    assert rows["parser_common.read_config_from_file"].state == "broken"
    assert rows["hv_train.setup_parser"].state == "absent"
    trainers = {s: (what, bad) for s, what, bad in installer.trainer_report(HOST, tmp_path, rows)}
    assert "selects through trainer_base" in trainers["wan_train_network.py"][0]
    assert "not a trainer this pack knows" in trainers["my_new_train_network.py"][0]


def test_other_hooks_keep_the_pack(tmp_path):
    (tmp_path / "immiscible_kohya_startup.pth").write_text("")
    (tmp_path / HOST.pth_name).write_text("")
    assert envinstall.other_hooks(tmp_path, HOST.pth_name) == ["immiscible_kohya_startup.pth"]
    assert "musubi_patch.startup" in PTH_LINE and "except Exception" in PTH_LINE
