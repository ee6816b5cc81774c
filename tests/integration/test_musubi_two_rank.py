"""Two ranks of the real musubi-tuner ``wan_train_network.py`` with ``--immiscible_scope global`` (CPU, gloo).

``accelerate launch --multi_gpu --num_processes 2`` with no visible GPU runs two CPU processes over
gloo, on the tiny Wan fixture (scripts/fixtures/musubi_make_wan_fixture.py, ``--task t2v-tiny`` via
scripts/fixtures/musubi_tiny_wan.py). On ``PYTHONPATH`` for this run only: the test-only CPU t5 shim
(scripts/fixtures/musubi_cpu_shim) and, with ``MUSUBI_TEST_DDP_SHIM=1``, its DDP shim (accelerate
on MULTI_CPU wraps the frozen DiT in DDP, which torch refuses). No ``--seed``: each rank seeds
itself, and rank 0's selection seed must be the one both use.

The dumped selections (``IMMISCIBLE_MUSUBI_DUMP``) are checked in the musubi venv against one
single-process ``select_noise`` of the concatenated global batch (same assignment, identical noise),
by the checker in test_sd_scripts_two_rank.py. Needs ``MUSUBI_DIR`` (``MUSUBI_VENV``: its venv);
about a minute, under ``flock`` of the heavy-run locks.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "scripts" / "fixtures"
K = 4

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("MUSUBI_DIR"), reason="MUSUBI_DIR (a kohya-ss/musubi-tuner checkout) is "
                       "not set; MUSUBI_VENV names its venv"),
]


def _checker():
    spec = importlib.util.spec_from_file_location("two_rank_checker", Path(__file__).with_name("test_sd_scripts_two_rank.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wan_train_network_two_ranks_global_assignment_equals_single_process(tmp_path):
    musubi = os.environ["MUSUBI_DIR"]
    venv = Path(os.environ.get("MUSUBI_VENV", "/work/ext/musubi/venv"))
    py = str(venv / "bin" / "python")
    checker = _checker()
    subprocess.run([py, str(REPO / "install.py"), "--musubi-tuner", musubi, "--python", py], check=True,
                   capture_output=True, timeout=300)
    fixture = tmp_path / "fixture"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES / "musubi_cpu_shim"), str(FIXTURES)]),
           "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    # 3 items at batch 2: rank 0 gets a batch of 2, rank 1 a batch of 1 (unequal per-rank batches)
    subprocess.run([py, str(FIXTURES / "musubi_make_wan_fixture.py"), str(fixture), "--dtype", "float32",
                    "--task", "t2v-tiny", "--items", "3", "--batch-size", "2"], check=True, capture_output=True,
                   cwd=musubi, env=env, timeout=600)
    dump = tmp_path / "dump"
    run_env = {**env, "IMMISCIBLE_MUSUBI_DUMP": str(dump), "MUSUBI_TEST_DDP_SHIM": "1"}
    cmd = checker.locked([str(venv / "bin" / "accelerate"), *checker.TWO_CPU_RANKS, str(FIXTURES / "musubi_tiny_wan.py"),
           "src/musubi_tuner/wan_train_network.py", "--task", "t2v-tiny",
           "--dit", str(fixture / "dit_t2v-tiny_random_float32.safetensors"),
           "--dataset_config", str(fixture / "dataset.toml"), "--sdpa", "--mixed_precision", "no",
           "--network_module", "networks.lora_wan", "--network_dim", "4", "--network_alpha", "1",
           "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--max_train_steps", "2",
           "--max_data_loader_n_workers", "0", "--timestep_sampling", "shift", "--discrete_flow_shift", "3.0",
           "--output_dir", str(tmp_path / "out"), "--output_name", "wan_lora",
           "--immiscible_k", str(K), "--immiscible_mode", "assign", "--immiscible_scope", "global"])
    checker.train_two_ranks(cmd, musubi, run_env, tmp_path / "train.log")
    summary = checker.run_checker(py, str(dump), K, "assign")
    checker.assert_global_equals_single_process(summary, K)
    assert len(summary["calls"]) >= 2
    assert any(c["drawn_seeds"][0] != c["drawn_seeds"][1] for c in summary["calls"]), summary  # ranks seeded alone
    meta = checker.safetensors_metadata(tmp_path / "out" / "wan_lora.safetensors")
    assert meta["ss_immiscible_scope"] == "global" and meta["ss_immiscible_mode"] == "assign"
    assert meta["ss_immiscible_stock_batches"] == "0"
    out = os.environ.get("IMMISCIBLE_TWO_RANK_OUT")
    if out:   # the evidence, for the docs
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "musubi_two_rank.json").write_text(json.dumps(summary, indent=1))
