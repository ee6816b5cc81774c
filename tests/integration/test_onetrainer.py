"""Real OneTrainer on the CPU: a 2-step SD1.5 LoRA through its own CLI (``scripts/train.py``).

Needs ``ONETRAINER_DIR`` (a checkout, tested at 23df3832), its venv's python in
``ONETRAINER_PYTHON`` with this pack installed (``install.py --onetrainer``), and
``IMMISCIBLE_CACHE`` with ``sd15_random_diffusers/`` and ``train_images/``; all three come from
``scripts/setup_onetrainer.sh``. Skips with the reason when any is missing. Each run takes about
30 s and 5 GB of RAM; with ``IMMISCIBLE_HEAVY_LOCK=FILE`` each runs under ``flock FILE``.

Each training run is one subprocess; a small driver (``_DRIVER``) runs ``scripts/train.py`` with
the noise point also recording, per call, what it returned and the step's timestep, so the tests
compare runs without changing what OneTrainer does.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OT = os.environ.get("ONETRAINER_DIR")
PY = os.environ.get("ONETRAINER_PYTHON")
CACHE = os.environ.get("IMMISCIBLE_CACHE")
MODEL = Path(CACHE or "/nonexistent") / "sd15_random_diffusers"
IMAGES = Path(CACHE or "/nonexistent") / "train_images"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (OT and PY and CACHE and Path(OT, "scripts/train.py").is_file() and Path(PY).is_file()
         and (MODEL / "model_index.json").is_file()),
    reason="needs ONETRAINER_DIR, ONETRAINER_PYTHON and IMMISCIBLE_CACHE with sd15_random_diffusers "
           "(eval \"$(scripts/setup_onetrainer.sh EXT_DIR)\")")

#: Runs OneTrainer's scripts/train.py as its CLI would (with the global generators seeded), and records
#: each call of the noise mixin's
#: _create_noise (the noise it returned, its generator's state after, the caller's timestep) and
#: each optimizer step, to OUT.json. Nothing it records changes what OneTrainer computes.
_DRIVER = r'''
import hashlib, json, runpy, sys, os
out_path = sys.argv.pop(1)
ot = os.environ["ONETRAINER_DIR"]
sys.path[:0] = [ot, os.path.join(ot, "scripts")]
os.chdir(ot)
import random, numpy, torch
# OneTrainer seeds no global generator (its LoRA's initial weights are drawn unseeded), so two stock
# runs differ; the driver seeds them alike in every run, which makes runs comparable bit for bit
random.seed(0); numpy.random.seed(0); torch.manual_seed(0)
from modules.trainer import GenericTrainer   # the hook patches here (unless disabled)
from modules.modelSetup.mixin import ModelSetupNoiseMixin as M
rec = {"noise": [], "timesteps": [], "after": [], "optimizer_steps": 0, "reductions": []}
inner = M.ModelSetupNoiseMixin._create_noise
def recording(self, source_tensor, config, generator, timestep=None, betas=None):
    out = inner(self, source_tensor, config, generator, timestep, betas)
    rec["noise"].append(out.flatten().tolist())
    rec["timesteps"].append(None if timestep is None else timestep.flatten().tolist())
    rec["after"].append(hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest())
    return out
M.ModelSetupNoiseMixin._create_noise = recording
step = torch.optim.Optimizer.step
import atexit
def dump():
    from onetrainer_patch.host import ADAPTER
    rt = ADAPTER._runtime
    rec["selections"] = rt.calls if rt is not None else None
    rec["stock_batches"] = rt.stock_batches if rt is not None else None
    with open(out_path, "w") as f:
        json.dump(rec, f)
atexit.register(dump)
sys.argv[0] = os.path.join(ot, "scripts", "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def _images(tmp: Path) -> Path:
    """Two of the cache's tiny images (with captions): batch 1, one epoch = 2 training steps."""
    import shutil

    folder = tmp / "images"
    folder.mkdir(exist_ok=True)
    for name in ("000.png", "000.txt", "001.png", "001.txt"):
        shutil.copy(IMAGES / name, folder / name)
    return folder


def _config(tmp: Path, **extra) -> Path:
    concept = {"name": "tiny", "path": str(_images(tmp)), "enabled": True, "include_subdirectories": False,
               "text": {"prompt_source": "sample"}, "image": {"enable_crop_jitter": False}}
    cfg = {
        "__version": 11, "training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": str(MODEL),
        "output_model_destination": str(tmp / "lora.safetensors"), "output_model_format": "KOHYA_LORA",
        "output_dtype": "FLOAT_32", "workspace_dir": str(tmp / "ws"), "cache_dir": str(tmp / "cache"),
        "train_device": "cpu", "temp_device": "cpu", "train_dtype": "FLOAT_32", "fallback_train_dtype": "FLOAT_32",
        "weight_dtype": "FLOAT_32", "lora_weight_dtype": "FLOAT_32", "resolution": "64", "batch_size": 1,
        "epochs": 1, "lora_rank": 4, "lora_alpha": 1.0, "learning_rate": 0.001, "dataloader_threads": 1,
        "unet": {"weight_dtype": "FLOAT_32"}, "text_encoder": {"weight_dtype": "FLOAT_32", "train": False},
        "vae": {"weight_dtype": "FLOAT_32"}, "tensorboard": False, "validation": False, "samples": [],
        "sample_after": 0, "sample_after_unit": "NEVER", "backup_after": 0, "backup_after_unit": "NEVER",
        "backup_before_save": False, "save_every_unit": "NEVER", "concepts": [concept], "only_cache": False,
    }
    cfg.update(extra)
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def run_onetrainer(tmp: Path, *config_values: str, disable: bool = False, ot_dir: str | None = None, **config):
    """Train 2 steps; returns (completed process, record dict or None)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = _config(tmp, **config)
    out = tmp / "record.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ONETRAINER_DIR": ot_dir or OT, "PYTHONUNBUFFERED": "1"}
    env.pop("IMMISCIBLE_ONETRAINER_DISABLE", None)
    if disable:
        env["IMMISCIBLE_ONETRAINER_DISABLE"] = "1"
    cmd = [PY, "-c", _DRIVER, str(out), "--config-path", str(cfg)]
    for cv in config_values:
        cmd += ["--config-value", cv]
    heavy = os.environ.get("IMMISCIBLE_HEAVY_LOCK")       # opt-in: one run at a time on a shared machine
    lock = ["flock", heavy] if heavy and _has_flock() else []
    proc = subprocess.run(lock + cmd, env=env, capture_output=True, text=True, timeout=600)
    rec = json.loads(out.read_text()) if out.is_file() else None
    return proc, rec


def _has_flock() -> bool:
    from shutil import which

    return which("flock") is not None


def _tensors(path: Path) -> dict:
    """Each tensor of a .safetensors file as (dtype, shape, its raw bytes): equal means bit-identical."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return {name: (t["dtype"], t["shape"], data[8 + n + t["data_offsets"][0]:8 + n + t["data_offsets"][1]])
            for name, t in header.items()}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


def _log(proc) -> str:
    return f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The runs several tests compare: stock (hook disabled), option absent, k=1 and k=8."""
    base = tmp_path_factory.mktemp("onetrainer")
    return {
        "stock": run_onetrainer(base / "stock", disable=True),
        "absent": run_onetrainer(base / "absent"),
        "k1": run_onetrainer(base / "k1", "immiscible_k=1"),
        "k8": run_onetrainer(base / "k8", "immiscible_k=8"),
        "base": base,
    }


def test_k8_saves_a_lora_with_metadata_and_one_selection_per_step(runs):
    proc, rec = runs["k8"]
    assert proc.returncode == 0, _log(proc)
    lora = runs["base"] / "k8" / "lora.safetensors"
    header = _header(lora)
    assert header.get("ss_immiscible_k") == "8" and header.get("ss_immiscible_mode") == "knn", header
    assert header.get("ss_immiscible_stock_batches") == "0", header
    assert rec["selections"] == 2 == len(rec["noise"]), rec["selections"]   # 2 steps, one selection each
    assert "immiscible: k=8" in proc.stderr + proc.stdout     # the start-up line


@pytest.mark.parametrize("off", ["absent", "k1"])
def test_off_gives_tensors_identical_to_stock(runs, off):
    (p_stock, r_stock), (p_off, r_off) = runs["stock"], runs[off]
    assert p_stock.returncode == 0, _log(p_stock)
    assert p_off.returncode == 0, _log(p_off)
    a, b = _tensors(runs["base"] / "stock" / "lora.safetensors"), _tensors(runs["base"] / off / "lora.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key] == b[key], key
    ha, hb = _header(runs["base"] / "stock" / "lora.safetensors"), _header(runs["base"] / off / "lora.safetensors")
    assert not any(k.startswith("ss_immiscible_") for k in hb)
    assert {k for k in ha if ha[k] != hb.get(k)} <= {"modelspec.date"}
    assert r_stock["noise"] == r_off["noise"] and len(r_off["noise"]) == 2
    assert r_off["selections"] == 0


def test_k8_changes_the_noise_but_not_the_timesteps_nor_the_generator(runs):
    (p_k1, r_k1), (p_k8, r_k8) = runs["k1"], runs["k8"]
    assert p_k1.returncode == 0 and p_k8.returncode == 0, _log(p_k8)
    r_absent = r_k1
    assert r_k8["timesteps"] == r_absent["timesteps"]
    assert r_k8["after"] == r_absent["after"]          # the step generator ends where stock leaves it
    assert r_k8["noise"] != r_absent["noise"]


def test_bad_raw_value_stops_at_start_up_naming_the_key(tmp_path):
    proc, rec = run_onetrainer(tmp_path, "immiscible_k=64.5")
    assert proc.returncode != 0
    assert "immiscible_k" in proc.stderr and "[1, " in proc.stderr, _log(proc)
    assert not (tmp_path / "lora.safetensors").exists()


def test_drifted_copy_stops_before_its_first_optimizer_step(tmp_path):
    """A OneTrainer whose base draw is no longer torch.randn(shape, generator=...) stops at k=8."""
    import shutil

    drift = tmp_path / "OneTrainer"
    shutil.copytree(OT, drift, symlinks=True, ignore=shutil.ignore_patterns("workspace*", ".git", "venv"))
    mixin = drift / "modules/modelSetup/mixin/ModelSetupNoiseMixin.py"
    src = mixin.read_text()
    stock_draw = "noise = torch.randn(\n            source_tensor.shape,\n            generator=generator,"
    assert stock_draw in src
    mixin.write_text(src.replace(stock_draw, "noise = torch.randn_like(source_tensor) if True else torch.randn(\n"
                                             "            source_tensor.shape,\n            generator=generator,"))
    proc, rec = run_onetrainer(tmp_path / "run", "immiscible_k=8", ot_dir=str(drift))
    assert proc.returncode != 0
    err = proc.stderr
    assert "SelectionNotApplied" in err and "before the first optimizer step" in err, _log(proc)
    assert "install.py --check --onetrainer" in err and "train.py (version " in err, _log(proc)
    assert not (tmp_path / "run" / "lora.safetensors").exists()


@pytest.mark.skipif(shutil.which("xvfb-run") is None,
                    reason="needs a virtual X server: xvfb-run (Debian: apt-get install xvfb libxcb-cursor0 "
                           "libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0)")
def test_the_gui_tab_shows_the_options_bound_to_the_config(tmp_path):
    """OneTrainer's real Qt training tab under Xvfb: the widgets sit below the noise settings, setting
    them sets the config, and the config OneTrainer saves carries them."""
    out, shot = tmp_path / "gui.json", tmp_path / "tab.png"
    proc = subprocess.run(["xvfb-run", "-a", PY, str(ROOT / "scripts/fixtures/onetrainer_gui_tab.py"), OT, str(out),
                           str(shot)], env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and out.is_file(), _log(proc)
    got = json.loads(out.read_text())
    labels = got["labels"]
    assert labels.index("Immiscible K") > labels.index("Perturbation Noise Weight")   # in the noise frame
    assert labels[-4:] == ["Immiscible K", "Immiscible Mode", "Immiscible Metric", "Immiscible Coarse"]
    assert got["before"] == {"immiscible_k": 1, "immiscible_mode": "knn", "immiscible_metric": "l2",
                             "immiscible_coarse": 0}
    want = {"immiscible_k": 8, "immiscible_mode": "assign", "immiscible_metric": "cosine", "immiscible_coarse": 4}
    assert got["after"] == want and got["saved"] == want
    assert "worse" in got["tooltips"]["Immiscible K"] and shot.stat().st_size > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
