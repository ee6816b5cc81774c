"""Two ranks of the real sd-scripts ``train_network.py`` with ``--immiscible_scope global`` (CPU, gloo).

``accelerate launch --multi_gpu --num_processes 2`` with no visible GPU runs two CPU processes over
gloo (accelerate 1.6's ``--cpu`` launcher would run one). The test-only DDP shim
``scripts/fixtures/ddp_cpu_shim`` (docs/sd-scripts.md) is on ``PYTHONPATH`` for this run only: on
MULTI_CPU accelerate wraps the frozen U-Net in DDP, which torch refuses. The run has no ``--seed``,
so each rank seeds itself (and draws its own selection seed): rank 0's must be used by both.

Each selection is dumped (``IMMISCIBLE_KOHYA_DUMP``: JSON rows, and each rank's latents and noise);
then, in the trainer's own venv, one single-process ``select_noise(concatenated global batch,
mode="assign", seed=rank 0's seed)`` must give the same assignment and identical noise.

Needs ``SD_SCRIPTS_DIR``, ``IMMISCIBLE_VENV`` and ``IMMISCIBLE_CACHE`` (scripts/setup_integration.sh);
about 2 minutes and 14 GB of RAM, under ``flock`` of /tmp/heavy.lock and /tmp/immiscible-heavy.lock. Run as a script, this file is
the checker (``python test_sd_scripts_two_rank.py DUMP_DIR K MODE METRIC COARSE``).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Heavy runs hold every lock other heavy jobs of this project take (two ranks need ~14 GB of RAM).
LOCKS = tuple(os.environ.get("IMMISCIBLE_HEAVY_LOCKS", "/tmp/heavy.lock /tmp/immiscible-heavy.lock").split())


def locked(cmd: list[str]) -> list[str]:
    """``cmd`` under ``flock`` of each of ``LOCKS`` (always taken in this order)."""
    return [part for lock in LOCKS for part in ("flock", lock)] + list(cmd)

#: ``accelerate launch`` arguments for two CPU ranks: ``--multi_gpu`` with no visible GPU is gloo.
TWO_CPU_RANKS = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


def train_two_ranks(cmd: list[str], cwd, env: dict, log_path: Path) -> str:
    """Run a two-rank training ``cmd``; its log goes to ``log_path``; it must end well under scope=global."""
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)  # lock waits
    log = res.stdout + res.stderr
    log_path.write_text(log)
    assert res.returncode == 0, log[-6000:]
    assert "scope=global" in log
    return log


#: The DDP shim (test-only sitecustomize; also used by scripts/e2e_sd_scripts.sh).
DDP_SHIM_DIR = REPO / "scripts" / "fixtures" / "ddp_cpu_shim"


# --------------------------------------------------------------------------- the checker (trainer venv)


def check_dumps(dump: str, k: int, mode: str, metric: str, coarse: int) -> dict:
    """Compare every dumped global selection with the single-process one; returns a summary."""
    import torch

    import immiscible

    rows = {r: [json.loads(line) for line in open(os.path.join(dump, f"rank{r}.jsonl"))] for r in (0, 1)}
    calls = []
    for n, (row0, row1) in enumerate(zip(rows[0], rows[1]), start=1):
        parts = [torch.load(os.path.join(dump, f"rank{r}_call{n}.pt")) for r in (0, 1)]
        latents = torch.cat([p["latents"] for p in parts])
        noise, info = immiscible.select_noise(latents, k, seed=row0["seed"], mode=mode, metric=metric,
                                              backend="torch", coarse=coarse or None, return_info=True)
        got = torch.cat([p["noise"] for p in parts])
        calls.append({
            "call": n, "point": row0["point"], "batch": [p["latents"].shape[0] for p in parts],
            "shape": list(latents.shape[1:]), "drawn_seeds": [row0["drawn_seed"], row1["drawn_seed"]],
            "seeds": [row0["seed"], row1["seed"]], "scope": [row0["scope"], row1["scope"]],
            "rows": [row0["rows"], row1["rows"]], "index": row0["index"], "index_rank1": row1["index"],
            "single_process_index": info.index.tolist(), "noise_identical": bool(torch.equal(got, noise)),
            "reduction": [row0["reduction"], row1["reduction"]], "single_process_reduction": info.reduction,
        })
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(dump, "*")))
    return {"calls": calls, "files": files, "torch": torch.__version__}


def assert_global_equals_single_process(summary: dict, k: int) -> None:
    calls = summary["calls"]
    assert calls, summary
    for c in calls:
        assert c["scope"] == ["global", "global"], c
        assert c["seeds"][0] == c["seeds"][1] == c["drawn_seeds"][0], c   # rank 0's seed, not mixed
        assert c["index"] == c["index_rank1"] == c["single_process_index"], c
        assert len(set(c["index"])) == sum(c["batch"]) and max(c["index"]) < k * sum(c["batch"]), c
        assert c["noise_identical"], c
        assert c["reduction"][0] == c["reduction"][1], c
        assert abs(c["reduction"][0] - c["single_process_reduction"]) < 1e-6, c
        assert c["rows"] == [[0, c["batch"][0]], [c["batch"][0], sum(c["batch"])]], c


def run_checker(python: str, dump: str, k: int, mode: str, metric: str = "l2", coarse: int = 0) -> dict:
    res = subprocess.run([python, __file__, dump, str(k), mode, metric, str(coarse)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


def safetensors_metadata(path) -> dict:
    """A .safetensors file's ``__metadata__`` (its header: 8-byte little-endian length, then JSON), read
    without the safetensors package, which the environment running pytest need not have."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)).get("__metadata__", {})


if __name__ == "__main__":
    print(json.dumps(check_dumps(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    sys.exit(0)


# --------------------------------------------------------------------------- the test

import pytest  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not all(os.environ.get(v) for v in ("SD_SCRIPTS_DIR", "IMMISCIBLE_VENV", "IMMISCIBLE_CACHE")),
                       reason="SD_SCRIPTS_DIR, IMMISCIBLE_VENV and IMMISCIBLE_CACHE are not all set: the two-rank run "
                       "needs a kohya-ss/sd-scripts checkout and the venv and cache of scripts/setup_integration.sh"),
]

K = 4


def test_train_network_two_ranks_global_assignment_equals_single_process(tmp_path):
    sd, py, cache = os.environ["SD_SCRIPTS_DIR"], os.environ["IMMISCIBLE_VENV"], Path(os.environ["IMMISCIBLE_CACHE"])
    subprocess.run([py, str(REPO / "install.py"), "--sd-scripts", sd, "--python", py], check=True,
                   capture_output=True, timeout=300)
    (tmp_path / "train_images").symlink_to(cache / "train_images")
    shim = DDP_SHIM_DIR
    dump = tmp_path / "dump"
    env = {**os.environ, "IMMISCIBLE_KOHYA_DUMP": str(dump), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(shim), sd])}
    cmd = locked([str(Path(py).parent / "accelerate"), *TWO_CPU_RANKS, str(Path(sd) / "train_network.py"),
           "--pretrained_model_name_or_path", str(cache / "sd15_random.safetensors"),
           "--tokenizer_cache_dir", str(cache / "tokenizer"), "--dataset_config",
           str(REPO / "configs" / "dataset_smoke_64px.toml"), "--network_module", "networks.lora",
           "--network_dim", "4", "--learning_rate", "1e-4", "--max_train_steps", "2", "--mixed_precision", "no",
           "--sdpa", "--save_model_as", "safetensors", "--output_name", "lora", "--output_dir", str(tmp_path / "out"),
           "--immiscible_k", str(K), "--immiscible_mode", "assign", "--immiscible_scope", "global"])
    train_two_ranks(cmd, tmp_path, env, tmp_path / "train.log")
    summary = run_checker(py, str(dump), K, "assign")
    assert_global_equals_single_process(summary, K)
    assert len(summary["calls"]) == 2   # two steps, one selection each per rank
    assert any(c["drawn_seeds"][0] != c["drawn_seeds"][1] for c in summary["calls"]), summary  # ranks seeded alone
    meta = safetensors_metadata(tmp_path / "out" / "lora.safetensors")
    assert meta["ss_immiscible_scope"] == "global" and meta["ss_immiscible_mode"] == "assign"
    assert meta["ss_immiscible_stock_batches"] == "0"
    out = os.environ.get("IMMISCIBLE_TWO_RANK_OUT")
    if out:   # the evidence, for the docs
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "sd_scripts_two_rank.json").write_text(json.dumps(summary, indent=1))
