"""Options, the start-up hook's safety, the launcher and the installer's static checks."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from immiscible_host import envinstall
from immiscible_host import options as host_options
from immiscible_host import installer
from kohya_patch import host
from kohya_patch.host import HOST

PTH_LINE = envinstall.pth_line(HOST.package, HOST.name)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- options


def parser_with_options():
    p = argparse.ArgumentParser()
    host_options.add_immiscible_arguments(p, k_help=HOST.k_help)
    host_options.add_immiscible_arguments(p, k_help=HOST.k_help)  # idempotent
    return p


def test_cli_defaults_are_off():
    s = host_options.settings_from_args(parser_with_options().parse_args([]))
    assert s == host_options.Settings() and not s.enabled and s.metadata() == {}


def test_cli_parses_and_rejects():
    p = parser_with_options()
    s = host_options.settings_from_args(p.parse_args(["--immiscible_k", "64", "--immiscible_mode", "assign",
                                                 "--immiscible_metric", "cosine", "--immiscible_backend", "torch",
                                                 "--immiscible_validation"]))
    assert (s.k, s.mode, s.metric, s.backend, s.validation) == (64, "assign", "cosine", "torch", True)
    for bad in (["--immiscible_k", "x"], ["--immiscible_mode", "hungarian"], ["--immiscible_metric", "l1"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_every_option_help_is_english_then_japanese_and_k_names_the_recommendation():
    helps = {a.dest: a.help for a in parser_with_options()._actions if a.dest.startswith("immiscible_")}
    assert set(helps) == set(host_options.DEFAULTS)
    for dest, text in helps.items():
        english, _, japanese = text.rpartition(" / ")
        assert english.isascii() and english, dest                          # sd-scripts' "English / 日本語"
        assert any("\u3040" <= ch <= "\u9fff" for ch in japanese), dest
    assert "Recommended 4 for flow-matching" in helps["immiscible_k"] and "4を推奨" in helps["immiscible_k"]


@pytest.mark.parametrize("key,value,exc,needle", [
    ("immiscible_k", "64", TypeError, "[1, 65536]"),
    ("immiscible_k", 64.5, TypeError, "[1, 65536]"),
    ("immiscible_k", 0, ValueError, "[1, 65536]"),
    ("immiscible_k", -3, ValueError, "[1, 65536]"),
    ("immiscible_k", True, TypeError, "integer"),
    ("immiscible_k", 70000, ValueError, "[1, 65536]"),
    ("immiscible_mode", "KNN", ValueError, "'knn', 'assign'"),
    ("immiscible_metric", 2, ValueError, "'l2', 'cosine'"),
    ("immiscible_backend", "cuda", ValueError, "'auto', 'torch', 'triton'"),
    ("immiscible_validation", "yes", TypeError, "true or false"),
])
def test_toml_values_are_validated(key, value, exc, needle):
    ns = parser_with_options().parse_args([])
    setattr(ns, key, value)
    with pytest.raises(exc) as info:
        host_options.settings_from_args(ns)
    assert key in str(info.value) and needle in str(info.value)


def test_upstream_knn_noise_conflict():
    ns = argparse.Namespace(knn_noise_k=4)
    host.check_upstream_overlap(ns, host_options.Settings(k=1))
    host.check_upstream_overlap(argparse.Namespace(knn_noise_k=1), host_options.Settings(k=8))
    with pytest.raises(ValueError, match="knn_noise_k"):
        host.check_upstream_overlap(ns, host_options.Settings(k=8))


# --------------------------------------------------------------------------- start-up hook and launcher


def run_py(code, env=None, cwd=None, timeout=60):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=timeout)


def test_pth_line_installs_hook_and_stays_quiet(tmp_path):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / HOST.pth_name).write_text(PTH_LINE)
    code = textwrap.dedent(f"""
        import site, sys
        site.addsitedir({str(site_dir)!r})
        from kohya_patch.host import ADAPTER
        print("active", ADAPTER.hook.installed(), "torch" in sys.modules)
        import json, email.parser  # unrelated imports work
    """)
    res = run_py(code, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 0 and res.stdout.split() == ["active", "True", "False"] and res.stderr == ""
    # without the pack on sys.path the line is a silent no-op
    res = run_py(f"import site; site.addsitedir({str(site_dir)!r}); print('ok')", env={"PYTHONPATH": ""},
                 cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok" and res.stderr == ""
    res = run_py(code, env={"PYTHONPATH": str(REPO), "IMMISCIBLE_KOHYA_DISABLE": "1"})
    assert res.stdout.split()[:2] == ["active", "False"]


def test_hook_ignores_a_foreign_library_package(tmp_path):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "__init__.py").write_text("")
    (tmp_path / "library" / "train_util.py").write_text("def get_noise_noisy_latents_and_timesteps(a, b, c):\n"
                                                        "    return 1\n")
    code = ("from kohya_patch.host import ADAPTER; ADAPTER.hook.install(); import library.train_util as t; "
            "print(hasattr(t.get_noise_noisy_latents_and_timesteps, '__immiscible_patched__'))")
    res = run_py(code, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_launcher_runs_script_as_main_with_its_folder_on_path(tmp_path):
    (tmp_path / "helper_mod.py").write_text("VALUE = 7\n")
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import sys, helper_mod
        from kohya_patch.host import ADAPTER
        print(__name__, sys.argv[1:], helper_mod.VALUE, ADAPTER.hook.installed())
    """))
    res = subprocess.run([sys.executable, "-m", "kohya_patch.run", str(tmp_path / "script.py"), "--a", "1"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/",
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "__main__ ['--a', '1'] 7 True"
    res = subprocess.run([sys.executable, "-m", "kohya_patch.run", str(tmp_path / "nope.py")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/", timeout=60)
    assert res.returncode == 2 and "no such script" in res.stderr


# --------------------------------------------------------------------------- installer


def fake_sd_scripts(root: Path, noise_body="    noise = torch.randn_like(latents, device=latents.device)\n"):
    lib = root / "library"
    lib.mkdir(parents=True)
    (lib / "train_util.py").write_text(
        "def add_training_arguments(parser, support_dreambooth): pass\n"
        "def read_config_from_file(args, parser): pass\n"
        "def verify_training_args(args): pass\n"
        "def get_sai_model_spec(state_dict, args, sdxl, lora, ti): pass\n"
        "def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):\n" + noise_body
        + "def conditional_loss(model_pred, target, loss_type, reduction, huber_c=None): pass\n")
    for name in ("flux_train_utils", "lumina_train_util"):
        (lib / f"{name}.py").write_text(
            "def get_noisy_model_input_and_timesteps(args, noise_scheduler, latents, noise, device, dtype): pass\n")
    (lib / "sd3_train_utils.py").write_text("def get_noisy_model_input_and_timesteps(args, latents, x, d, t): pass\n")
    (root / "train_control_net.py").write_text("def train(args):\n    noise = torch.randn_like(latents)\n")
    return root


def report(root, external=None):
    return {name: status for name, status in installer.patch_point_report(HOST, root, external)}


def test_patch_point_report_reads_sources_statically(tmp_path):
    rows = report(fake_sd_scripts(tmp_path))
    assert list(rows) == [p.name for p in HOST.points]  # one line per point of the one table
    noise = rows["train_util.get_noise_noisy_latents_and_timesteps"]
    assert noise.ok and noise.detail == "library/train_util.py:5"
    sd3 = rows["sd3_train_utils.get_noisy_model_input_and_timesteps"]
    assert sd3.state == "broken" and "noise" in sd3.detail
    assert rows["accelerate.Accelerator.init_trackers"].ok  # outside sd-scripts: not read from its tree
    rows = report(tmp_path, {"accelerate.Accelerator.init_trackers": "ModuleNotFoundError: accelerate"})
    assert rows["accelerate.Accelerator.init_trackers"].state == "broken"


def test_patch_point_report_notices_a_changed_noise_draw(tmp_path):
    root = fake_sd_scripts(tmp_path, noise_body="    noise = torch.randn(latents.shape)\n")
    rows = report(root)
    assert rows["train_util.get_noise_noisy_latents_and_timesteps"].state == "broken"


def test_an_older_sd_scripts_has_absent_points_and_the_old_controlnet_name(tmp_path):
    """v0.8.7 / v0.9.1: no FLUX/SD3/Lumina utils, and the ControlNet trainer is train_controlnet.py."""
    root = fake_sd_scripts(tmp_path)
    for name in ("flux_train_utils", "sd3_train_utils", "lumina_train_util"):
        (root / "library" / f"{name}.py").unlink()
    (root / "train_control_net.py").rename(root / "train_controlnet.py")
    rows = report(root)
    for name in ("flux_train_utils", "sd3_train_utils", "lumina_train_util"):
        status = rows[f"{name}.get_noisy_model_input_and_timesteps"]
        assert status.state == "absent" and "not in this version" in status.detail
    assert rows["train_control_net.train (inline noise)"].ok
    assert rows["train_control_net.train (inline noise)"].detail == "train_controlnet.py:1"
    assert "absent  flux_train_utils" in envinstall.format_point(
        "flux_train_utils.get_noisy_model_input_and_timesteps", rows["flux_train_utils.get_noisy_model_input_and_timesteps"])


def test_a_shim_that_only_imports_train_is_not_the_point(tmp_path):
    """48d368fa ships both: train_controlnet.py imports train() from train_control_net.py."""
    root = fake_sd_scripts(tmp_path)
    (root / "train_controlnet.py").write_text("from train_control_net import setup_parser, train\n")
    assert report(root)["train_control_net.train (inline noise)"].detail == "train_control_net.py:1"
    (root / "train_control_net.py").unlink()
    status = report(root)["train_control_net.train (inline noise)"]
    assert status.state == "broken" and "train_controlnet.py" in status.detail


def test_installer_refuses_a_non_sd_scripts_folder(tmp_path, capsys):
    assert installer.main(HOST, str(tmp_path), python=sys.executable) == 2
    assert "must name a checkout of sd-scripts" in capsys.readouterr().out


def _fake_probe(monkeypatch, probe):
    monkeypatch.setattr(envinstall, "probe", lambda python, package, external=(): probe(python, external))


def _fake_pip(monkeypatch, pip):
    monkeypatch.setattr(envinstall, "pip", lambda python, say, *args: pip(python, *args))


def test_check_and_uninstall_report_without_side_effects(tmp_path, capsys, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _fake_probe(monkeypatch, lambda python, external=(): {
        "python": python, "version": "3.x", "site_packages": str(site), "kohya_patch": str(REPO / "kohya_patch"),
        "immiscible_host": str(REPO / "immiscible_host"), "hook_active": False, "dist": None, "torch": "2.x",
        "external": {p.name: None for p in external}})
    assert installer.main(HOST, str(fake_sd_scripts(tmp_path / "sd")), check=True) == 1  # hook missing
    out = capsys.readouterr().out
    assert "MISSING" in out and "not a git checkout" in out
    lines = [ln for ln in out.splitlines() if "  [" in ln]
    assert len(lines) == len(HOST.points) and "accelerate.Accelerator.backward" in lines[-1]
    (site / HOST.pth_name).write_text(PTH_LINE)
    assert installer.main(HOST, uninstall=True) == 0
    assert installer.main(HOST, uninstall=True) == 0  # idempotent
    assert not any(site.iterdir())


def test_an_install_from_before_immiscible_host_is_refreshed(tmp_path, monkeypatch, capsys):
    """An editable install maps only the packages it knew: kohya_patch imports, immiscible_host does not."""
    site = tmp_path / "site"
    site.mkdir()
    state = {"host": None}
    _fake_probe(monkeypatch, lambda python, external=(): {
        "python": python, "version": "3.x", "site_packages": str(site), "kohya_patch": str(REPO / "kohya_patch"),
        "immiscible_host": state["host"], "hook_active": True, "dist": "0.1.0", "torch": "2.x",
        "external": {p.name: None for p in external}})
    pips = []

    def pip(python, *args):
        pips.append(args)
        state["host"] = str(REPO / "immiscible_host")
        return 0

    _fake_pip(monkeypatch, pip)
    assert installer.main(HOST, check=True) == 1
    assert "INCOMPLETE" in capsys.readouterr().out
    sd = fake_sd_scripts(tmp_path / "sd")
    (sd / "library" / "sd3_train_utils.py").write_text(
        "def get_noisy_model_input_and_timesteps(args, latents, noise, device, dtype): pass\n")
    assert installer.main(HOST, str(sd)) == 0
    assert pips == [("install", "--no-deps", "--no-build-isolation", "-e", str(envinstall.PACK_DIR))]
    assert "pip_installed" not in (site / HOST.marker_name).read_text()  # it was there before: keep it on uninstall
    assert installer.main(HOST, str(tmp_path / "sd")) == 0 and len(pips) == 1  # idempotent


def test_uninstall_leaves_the_pack_to_another_adapter_in_the_same_venv(tmp_path, monkeypatch, capsys):
    """sd-scripts installed first, musubi-tuner's hook beside it: removing ours must not break theirs."""
    site = tmp_path / "site"
    site.mkdir()
    _fake_probe(monkeypatch, lambda python, external=(): {
        "python": python, "version": "3.x", "site_packages": str(site), "kohya_patch": str(REPO / "kohya_patch"),
        "immiscible_host": str(REPO / "immiscible_host"), "hook_active": True, "dist": "0.2.0", "torch": "2.x",
        "external": {}})
    pips = []
    _fake_pip(monkeypatch, lambda python, *args: pips.append(args) or 0)
    (site / HOST.pth_name).write_text(PTH_LINE)
    (site / HOST.marker_name).write_text('{"pip_installed": true}')
    (site / "immiscible_musubi_startup.pth").write_text("import musubi_patch.startup\n")
    assert installer.main(HOST, uninstall=True) == 0
    assert pips == [] and "still used by immiscible_musubi_startup.pth" in capsys.readouterr().out
    assert sorted(p.name for p in site.iterdir()) == ["immiscible_musubi_startup.pth"]
    (site / "immiscible_musubi_startup.pth").unlink()
    (site / HOST.pth_name).write_text(PTH_LINE)
    (site / HOST.marker_name).write_text('{"pip_installed": true}')
    assert installer.main(HOST, uninstall=True) == 0 and pips == [("uninstall", "-y", envinstall.DIST_NAME)]
