"""The kohya_ss GUI user's path (bmaltais/kohya_ss): install into the GUI's venv, type
``--immiscible_k 64`` into Advanced -> Additional parameters, press Start training.

Needs ``KOHYA_GUI_DIR`` (a kohya_ss checkout whose ``sd-scripts`` folder holds the sd-scripts it
pins) and ``KOHYA_GUI_PYTHON`` (the GUI venv's python: ``<gui>/venv/bin/python``, or uv's
``<gui>/.venv/bin/python``). The command is built by the GUI's own code
(``scripts/fixtures/kohya_gui_command.py``: ``AccelerateLaunch.run_cmd``,
``common_gui.run_cmd_advanced_training``, ``common_gui.setup_environment``), then:

- its trainer arguments go through the pinned sd-scripts' own parser and ``read_config_from_file``
  (the options arrive, quotes stripped, and win over the TOML; start-up validates them);
- with ``IMMISCIBLE_E2E=1`` and ``IMMISCIBLE_CACHE`` (scripts/setup_integration.sh), the exact argv
  runs: ``accelerate launch ... train_network.py --config_file GUI.toml --immiscible_k 64`` for 2
  CPU steps on the random SD1.5 checkpoint, and the LoRA must carry ``ss_immiscible_k = 64``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUI = os.environ.get("KOHYA_GUI_DIR")
PY = os.environ.get("KOHYA_GUI_PYTHON")
CACHE = os.environ.get("IMMISCIBLE_CACHE")
LOCK = os.environ.get("IMMISCIBLE_HEAVY_LOCK", "/tmp/immiscible-heavy.lock")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (GUI and PY), reason="KOHYA_GUI_DIR and KOHYA_GUI_PYTHON are not set: these tests drive "
                                                "a kohya_ss GUI checkout and its venv (see docs/kohya_ss_gui.md)"),
]

PARSE = r"""
import importlib, json, sys
sys.argv = json.loads(sys.argv[1])
from kohya_patch.host import ADAPTER
ADAPTER.hook.install()
from kohya_patch.host import ADAPTER; RUNTIME = ADAPTER.runtime
tn = importlib.import_module("train_network")
parser = tn.setup_parser()
args = parser.parse_args(sys.argv[1:])
args = tn.train_util.read_config_from_file(args, parser)
print("@@" + json.dumps({"k": args.immiscible_k, "mode": args.immiscible_mode, "dim": args.network_dim,
                         "configured": RUNTIME.settings.k, "train_util": tn.train_util.__file__}))
"""


def gui_toml(path: Path, out: Path, steps: int = 2) -> Path:
    """A config TOML like the one the GUI's LoRA tab writes (toml.dump of its non-empty fields)."""
    cache = Path(CACHE or "/nonexistent")
    cfg = {
        "pretrained_model_name_or_path": str(cache / "sd15_random.safetensors"),
        "tokenizer_cache_dir": str(cache / "tokenizer"), "dataset_config": str(REPO / "configs/dataset_smoke_64px.toml"),
        "network_module": "networks.lora", "network_dim": 4, "network_alpha": 1, "learning_rate": 0.0001,
        "max_train_steps": steps, "mixed_precision": "no", "sdpa": True, "seed": 42, "save_model_as": "safetensors",
        "output_dir": str(out), "output_name": "gui_lora", "logging_dir": str(out / "logs"), "log_with": "tensorboard",
    }
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in cfg.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def gui_command(toml: Path, additional: str) -> dict:
    accelerate = str(Path(PY).parent / "accelerate")
    res = subprocess.run([PY, str(REPO / "scripts/fixtures/kohya_gui_command.py"), GUI, str(toml), additional,
                          accelerate], capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def gui_env(cmd: dict) -> dict:
    return {**os.environ, "PYTHONPATH": cmd["pythonpath"], "PYTHONUNBUFFERED": "1", "IMMISCIBLE_KOHYA_DISABLE": ""}


def test_install_into_the_gui_venv_checks_clean():
    res = subprocess.run([PY, str(REPO / "install.py"), "--sd-scripts", str(Path(GUI) / "sd-scripts"), "--python", PY],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "all good" in res.stdout and "train_network.py: selects" in res.stdout


def test_the_gui_command_carries_the_options_into_train_network(tmp_path):
    cmd = gui_command(gui_toml(tmp_path / "config_lora.toml", tmp_path / "out"),
                      '--immiscible_k 64 --immiscible_mode "assign"')
    argv = cmd["argv"]
    script = next(i for i, a in enumerate(argv) if a.endswith("/sd-scripts/train_network.py"))
    assert argv[script + 1:script + 7] == ["--config_file", str(tmp_path / "config_lora.toml"), "--immiscible_k", "64",
                                           "--immiscible_mode", "assign"]  # quotes stripped, after the TOML
    res = subprocess.run([PY, "-c", PARSE, json.dumps(argv[script:])], capture_output=True, text=True, timeout=300,
                         env={**gui_env(cmd), "PYTHONPATH": f"{REPO}{os.pathsep}{cmd['pythonpath']}"}, cwd=tmp_path)
    got = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("@@")][-1][2:]) if "@@" in res.stdout \
        else pytest.fail(res.stderr[-3000:])
    assert got["k"] == 64 and got["mode"] == "assign" and got["dim"] == 4 and got["configured"] == 64
    assert got["train_util"].startswith(str(Path(GUI) / "sd-scripts"))  # the GUI's own sd-scripts, via PYTHONPATH


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IMMISCIBLE_E2E") != "1" or not CACHE,
                    reason="set IMMISCIBLE_E2E=1 and IMMISCIBLE_CACHE to run the GUI's command (2 CPU steps, ~7 GB)")
def test_the_gui_command_trains_a_selected_lora(tmp_path):
    out = tmp_path / "out"
    cmd = gui_command(gui_toml(tmp_path / "config_lora.toml", out), "--immiscible_k 64")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "train_images").symlink_to(Path(CACHE) / "train_images")  # dataset_smoke_64px.toml: relative image_dir
    res = subprocess.run(["flock", LOCK, *cmd["argv"]], capture_output=True, text=True, timeout=1800,
                         env=gui_env(cmd), cwd=runs)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    assert "immiscible: k=64" in res.stdout + res.stderr
    check = ("import json, sys\nfrom safetensors import safe_open\n"
             "with safe_open(sys.argv[1], 'pt') as f:\n    m = f.metadata()\n"
             "print(json.dumps({k: v for k, v in m.items() if k.startswith('ss_immiscible') or k == 'ss_steps'}))")
    meta = json.loads(subprocess.run([PY, "-c", check, str(out / "gui_lora.safetensors")], capture_output=True,
                                     text=True, check=True).stdout)
    assert meta["ss_immiscible_k"] == "64" and meta["ss_immiscible_stock_batches"] == "0" and meta["ss_steps"] == "2"
    print("\n" + json.dumps({"argv": cmd["argv"], "metadata": meta}))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
