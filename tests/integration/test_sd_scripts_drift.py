"""Drift: sd-scripts changed under the pack. Every kind stops a ``--immiscible_k 8`` run clearly,
at start-up or before its first optimizer step; none trains on stock noise.

Each kind is applied to a temporary copy of the real checkout ``SD_SCRIPTS_DIR`` (never to the
checkout itself), in a subprocess of ``IMMISCIBLE_VENV`` with the copy as working directory. The
step is the real one: ``train_network.NetworkTrainer.get_noise_pred_and_target`` (the U-Net call
replaced by zeros) followed by the real ``accelerate.Accelerator.backward``. ``install.py --check``'s
static report of the copy is checked too. Needs a checkout with ``get_noise_pred_and_target``
(8ebe858f and later; main ``48d368fa`` is the reference).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SD = os.environ.get("SD_SCRIPTS_DIR")
PY = os.environ.get("IMMISCIBLE_VENV") or sys.executable
FN = "get_noise_noisy_latents_and_timesteps"
FIRST_DRAW = "noise = torch.randn_like(latents, device=latents.device)"


def _sub(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path.name}: {old!r} not found (the reference checkout changed)"
    path.write_text(text.replace(old, new, count), encoding="utf-8")


def _rename_param(path: Path) -> None:
    """``latents`` renamed in the noise function's signature (its body is never reached: start-up stops)."""
    text = path.read_text(encoding="utf-8")
    new, n = re.subn(rf"(def {FN}\(\s*args, noise_scheduler, )latents\b", r"\1latents_in", text)
    assert n == 1, f"{path.name}: the signature of {FN} changed"
    path.write_text(new, encoding="utf-8")


def _bypass(tn: Path) -> None:
    """train_network.py draws and mixes its noise itself instead of calling the patched function."""
    text = tn.read_text(encoding="utf-8")
    call = re.search(r"train_util\.get_noise_noisy_latents_and_timesteps\(\s*args, noise_scheduler, latents\s*\)", text)
    assert call, "train_network.py no longer calls train_util.get_noise_noisy_latents_and_timesteps"
    text = text[:call.start()] + "_own_noise(args, noise_scheduler, latents)" + text[call.end():]
    text += ('\n\ndef _own_noise(args, noise_scheduler, latents):\n'
             '    noise = torch.randn_like(latents)\n'
             '    timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()\n'
             '    return noise, noise_scheduler.add_noise(latents, noise, timesteps), timesteps\n')
    tn.write_text(text, encoding="utf-8")


#: kind -> (what it simulates, how the copy is changed, the script run, how it must stop)
DRIFTS = {
    "renamed": ("the noise function renamed, its callers updated",
                lambda r: [_sub(r / "library/train_util.py", f"def {FN}(", f"def {FN}_v2("),
                           _sub(r / "train_network.py", f"train_util.{FN}(", f"train_util.{FN}_v2(", -1)],
                "train_network.py", "start-up"),
    "signature": ("a parameter of the noise function renamed",
                  lambda r: _rename_param(r / "library/train_util.py"),
                  "train_network.py", "start-up"),
    "draw": ("the base noise drawn with torch.randn instead of torch.randn_like(latents)",
             lambda r: _sub(r / "library/train_util.py", FIRST_DRAW,
                            "noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)"),
             "train_network.py", "first step"),
    "bypass": ("the trainer draws its noise itself, never calling the patched function",
               lambda r: _bypass(r / "train_network.py"), "train_network.py", "first step"),
    "unknown_trainer": ("a trainer script the pack does not know, drawing its noise itself",
                        lambda r: (shutil.copy(r / "train_network.py", r / "my_lora_trainer.py"),
                                   _bypass(r / "my_lora_trainer.py")),
                        "my_lora_trainer.py", "first step"),
}


# =========================================================================== probe (run in the venv)


def probe_step(script):
    """Start-up as ``script`` with k=8, one real noise step, the real accelerator.backward."""
    import contextlib
    import importlib
    import logging

    sys.path.insert(0, os.getcwd())
    from kohya_patch.host import ADAPTER

    assert ADAPTER.hook.install()
    logging.disable(logging.WARNING)
    import accelerate
    import torch
    from diffusers import DDPMScheduler

    from immiscible_host.runtime import SelectionNotApplied
    from immiscible_host import installer
    from kohya_patch.host import ADAPTER, HOST
    from kohya_patch.host import ADAPTER; RUNTIME = ADAPTER.runtime

    ADAPTER.script = script
    tn = importlib.import_module(script[:-3])
    out = {"static": {n: str(s) for n, s in installer.patch_point_report(HOST, Path(os.getcwd()))},
           "trainers": {s: [w, p] for s, w, p in installer.trainer_report(HOST,
               Path(os.getcwd()), dict(installer.patch_point_report(HOST, Path(os.getcwd()))))}}
    parser = tn.setup_parser()
    args = parser.parse_args(["--immiscible_k", "8"])
    try:
        tn.train_util.verify_training_args(args)
    except ValueError as exc:
        out["stopped"] = ["start-up", str(exc)]
        return print("@@" + json.dumps(out), flush=True)

    class Trainer(tn.NetworkTrainer):
        def call_unet(self, args, accelerator, unet, noisy_latents, *a, **kw):
            return noisy_latents * w

    class Acc(accelerate.Accelerator):
        def autocast(self):
            return contextlib.nullcontext()

    w = torch.ones(1, requires_grad=True)
    acc = Acc(cpu=True)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, clip_sample=False)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    pred, target = Trainer().get_noise_pred_and_target(args, acc, sched, latents, {}, [None], None, None,
                                                       torch.float32, True, is_train=True)[:2]
    try:
        acc.backward(((pred - target) ** 2).mean())
        out["stopped"] = None
    except SelectionNotApplied as exc:
        out["stopped"] = ["first step", str(exc)]
    out["grad_applied"] = w.grad is not None
    out["stock_batches"], out["selected"] = RUNTIME.stock_batches, RUNTIME.calls
    print("@@" + json.dumps(out), flush=True)


# =========================================================================== pytest side

if __name__ != "__main__":
    import pytest

    pytestmark = [
        pytest.mark.integration,
        pytest.mark.skipif(not SD, reason="SD_SCRIPTS_DIR is not set: the drift tests modify temporary copies of a "
                                          "real kohya-ss/sd-scripts checkout (see docs/sd-scripts.md)"),
    ]

    def _copy(tmp_path) -> Path:
        dest = tmp_path / "sd-scripts"
        shutil.copytree(SD, dest, ignore=shutil.ignore_patterns(".git", "images", "docs", "tests", "*.egg-info",
                                                                 "__pycache__", "bitsandbytes_windows"))
        return dest

    def run_step(root, script):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(root)]), "IMMISCIBLE_KOHYA_DISABLE": ""}
        res = subprocess.run([PY, str(Path(__file__).resolve()), "probe_step", script], cwd=root, env=env,
                             capture_output=True, text=True, timeout=600)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("@@")]
        assert res.returncode == 0 and lines, f"probe failed ({res.returncode}):\n{res.stderr[-4000:]}"
        return json.loads(lines[-1][2:])

    def test_the_unmodified_copy_selects_and_trains(tmp_path):
        r = run_step(_copy(tmp_path), "train_network.py")
        assert r["stopped"] is None and r["selected"] == 1 and r["stock_batches"] == 0 and r["grad_applied"], r

    @pytest.mark.parametrize("kind", list(DRIFTS))
    def test_drift_stops_the_run(tmp_path, kind):
        what, change, script, where = DRIFTS[kind]
        root = _copy(tmp_path)
        change(root)
        r = run_step(root, script)
        assert r["stopped"], f"{kind} ({what}): the run was not stopped: {r}"
        stage, msg = r["stopped"]
        assert stage == where, (kind, r["stopped"])
        assert "--immiscible_k 8" in msg or "immiscible_k" in msg
        assert "version" in msg and "install.py --check" in msg, msg
        if stage == "first step":
            assert script in msg and not r["grad_applied"], r
        else:
            assert FN in msg and script in msg, msg
        print(f"\n[{kind}] {what}\n  -> stopped at {stage}: {msg}")
        static = r["static"][f"train_util.{FN}"]
        if kind in ("renamed", "signature"):
            assert static.startswith("broken"), static
            assert r["trainers"]["train_network.py"][1] is True  # --check exits non-zero
        if kind == "unknown_trainer":
            assert "not a trainer this pack knows" in r["trainers"]["my_lora_trainer.py"][0]

    @pytest.mark.slow
    @pytest.mark.skipif(os.environ.get("IMMISCIBLE_E2E") != "1" or not os.environ.get("IMMISCIBLE_CACHE"),
                        reason="set IMMISCIBLE_E2E=1 and IMMISCIBLE_CACHE to run a real drifted train_network.py")
    def test_a_real_drifted_run_stops_before_its_first_optimizer_step(tmp_path):
        """The whole trainer (hook from the venv's start-up .pth), base draw changed: it must not train."""
        cache = Path(os.environ["IMMISCIBLE_CACHE"])
        root = _copy(tmp_path)
        DRIFTS["draw"][1](root)
        (tmp_path / "train_images").symlink_to(cache / "train_images")
        argv = [PY, str(root / "train_network.py"), "--pretrained_model_name_or_path", str(cache / "sd15_random.safetensors"),
                "--tokenizer_cache_dir", str(cache / "tokenizer"),
                "--dataset_config", str(REPO / "configs/dataset_smoke_64px.toml"), "--network_module", "networks.lora",
                "--network_dim", "4", "--max_train_steps", "2", "--mixed_precision", "no", "--sdpa", "--seed", "42",
                "--output_dir", str(tmp_path / "out"), "--output_name", "lora", "--immiscible_k", "8"]
        env = {**os.environ, "PYTHONPATH": str(root), "IMMISCIBLE_KOHYA_DISABLE": ""}
        res = subprocess.run(["flock", os.environ.get("IMMISCIBLE_HEAVY_LOCK", "/tmp/immiscible-heavy.lock"), *argv],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        log = res.stdout + res.stderr
        assert res.returncode != 0, log[-3000:]
        assert "SelectionNotApplied" in log and "Stopping before the first optimizer step" in log, log[-3000:]
        assert "no longer draws its noise with torch.randn_like(latents)" in log
        assert not (tmp_path / "out" / "lora.safetensors").exists()
        print("\n" + next(ln for ln in log.splitlines() if "SelectionNotApplied:" in ln)[:1500])


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
