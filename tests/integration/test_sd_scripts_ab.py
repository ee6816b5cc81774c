"""The A/B command on the real sd-scripts (CPU, random-weight SD1.5, 64 px, cached latents, 4 steps).

- sd-scripts main (``SD_SCRIPTS_DIR`` with ``IMMISCIBLE_VENV``): a 2-seed A/B at ``--k 8`` with
  validation and sample prompts produces report.md, its figures and the sample sheet, and in every
  seed the treatment (k = 8) trained on the same timesteps and the same images in the same order as
  the control (k = 1) while its noise was selected (common random numbers, recorded in-process);
- the self-test (A/A) gives bit-identical validation losses;
- one seed on every checkout of ``SD_SCRIPTS_MATRIX`` that has a validation loss (the kohya_ss GUI
  v25.2.2 pin ``2e0fcc50``: ``scripts/setup_integration.sh --matrix EXT_DIR CHECKOUT``).

Each A/B holds ``flock $IMMISCIBLE_HEAVY_LOCK`` (default /tmp/immiscible-heavy.lock): two trainings
of about a minute and 7 GB each per seed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SD = os.environ.get("SD_SCRIPTS_DIR")
VENV = os.environ.get("IMMISCIBLE_VENV")
CACHE = os.environ.get("IMMISCIBLE_CACHE")
LOCK = os.environ.get("IMMISCIBLE_HEAVY_LOCK", "/tmp/immiscible-heavy.lock")
needs_main = pytest.mark.skipif(not (SD and VENV and CACHE), reason="SD_SCRIPTS_DIR, IMMISCIBLE_VENV and "
                                "IMMISCIBLE_CACHE are not all set: the A/B needs a kohya-ss/sd-scripts checkout, its "
                                "venv with the pack installed, and the random SD1.5 checkpoint "
                                "(scripts/setup_integration.sh)")


def matrix_pairs():
    pairs = [e.split("=", 1) for e in os.environ.get("SD_SCRIPTS_MATRIX", "").split() if "=" in e]
    return [(co, py) for co, py in pairs
            if "--validation_split" in Path(co, "train_network.py").read_text(encoding="utf-8", errors="replace")]


def workdir(tmp: Path) -> Path:
    """8 tiny images (the cache's 4, twice, with their own captions), a dataset config, two sample prompts."""
    imgs = tmp / "imgs"
    imgs.mkdir(parents=True)
    for i, png in enumerate(sorted(Path(CACHE, "train_images").glob("*.png"))[:4]):
        for copy in "ab":
            shutil.copy(png, imgs / f"{copy}{i:03d}.png")
            (imgs / f"{copy}{i:03d}.txt").write_text(f"a picture, variant {copy}, number {i}\n")
    (tmp / "dataset.toml").write_text('[general]\ncaption_extension = ".txt"\nshuffle_caption = false\n\n'
                                      '[[datasets]]\nresolution = 64\nbatch_size = 2\nenable_bucket = false\n\n'
                                      '  [[datasets.subsets]]\n  image_dir = "imgs"\n  num_repeats = 1\n')
    (tmp / "prompts.txt").write_text("a picture --w 64 --h 64 --s 2\nanother picture --w 64 --h 64 --s 2 --d 7\n")
    return tmp


def run_ab(tmp: Path, checkout: str, python: str, *own, samples: bool = True) -> tuple[dict, str]:
    cmd = ["flock", LOCK, python, "-m", "kohya_patch.ab", *own, "--steps", "4", "--out", "ab", "--",
           python, str(Path(checkout, "train_network.py")),
           "--pretrained_model_name_or_path", str(Path(CACHE, "sd15_random.safetensors")),
           "--tokenizer_cache_dir", str(Path(CACHE, "tokenizer")), "--dataset_config", "dataset.toml",
           "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-4",
           "--mixed_precision", "no", "--sdpa", "--seed", "42", "--cache_latents", "--cache_latents_to_disk",
           "--validation_split", "0.25"]
    if samples:
        cmd += ["--sample_prompts", "prompts.txt", "--sample_every_n_steps", "4"]
    env = dict(os.environ, PYTHONPATH=checkout)   # as the kohya_ss GUI runs a checkout from a shared venv
    res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=3600, env=env)
    assert res.returncode == 0, res.stderr[-6000:]
    return json.loads((tmp / "ab" / "results.json").read_text()), res.stdout


@needs_main
def test_two_seed_ab_on_main_makes_the_report_and_k8_trains_on_k1s_timesteps_and_images(tmp_path):
    res, out = run_ab(workdir(tmp_path), SD, VENV, "--k", "8", "--seeds", "2")
    assert res["seeds"] == [42, 43] and res["interval"] is None and len(res["effects"]) == 2
    assert "no interval" in res["verdict"]
    for seed, r in res["per_seed"].items():
        # common random numbers on the real trainer: same per-step timesteps, same images in the same order
        assert r["crn"]["steps"] == [4, 4], (seed, r["crn"])
        assert r["crn"]["same_timesteps"] and r["crn"]["same_images"], (seed, r["crn"])
        assert r["reduction"] is not None and r["reduction"] > 0       # ...while the treatment's noise was selected
        assert r["same_validation_items"] and r["final_step"] == [4, 4]
        assert r["d"] is not None and r["d"] != 0.0                      # the arms trained differently
        assert sorted(r["per_timestep"]) and all(len(v) == 2 for v in r["per_timestep"].values())
    report = tmp_path / "ab" / "report.md"
    text = report.read_text()
    assert "## Verdict" in text and "![validation loss" in text and "![the same prompts and seeds" in text
    for png in ("val_loss.png", "effects.png", "samples.png"):
        assert (tmp_path / "ab" / png).stat().st_size > 1000
    assert str(report) in out


@needs_main
def test_self_test_gives_bit_identical_validation_losses(tmp_path):
    res, _ = run_ab(workdir(tmp_path), SD, VENV, "--self_test", "--seeds", "1", samples=False)
    r = res["per_seed"]["42"]
    assert r["exactly_equal"] and r["d"] == 0.0 and res["effects"] == [0.0]
    assert r["crn"]["same_timesteps"] and r["crn"]["same_images"]
    assert "exactly 0" in res["verdict"]


@pytest.mark.skipif(not (CACHE and matrix_pairs()), reason="SD_SCRIPTS_MATRIX names no checkout with a validation "
                    "loss (e.g. the kohya_ss GUI v25.2.2 pin 2e0fcc50: scripts/setup_integration.sh --matrix), or "
                    "IMMISCIBLE_CACHE is not set")
def test_one_seed_on_each_validating_checkout_of_the_matrix(tmp_path):
    for i, (checkout, python) in enumerate(matrix_pairs()):
        res, _ = run_ab(workdir(tmp_path / str(i)), checkout, python, "--k", "8", "--seeds", "1")
        r = res["per_seed"]["42"]
        assert r["crn"]["same_timesteps"] and r["crn"]["same_images"] and r["reduction"] > 0, checkout
        assert r["d"] is not None and (tmp_path / str(i) / "ab" / "report.md").exists(), checkout
