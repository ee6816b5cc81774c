"""``select_noise(..., group=...)`` over a real two-process gloo group (``--immiscible_scope global``).

The test starts this file twice as a script (ranks 0 and 1 of a gloo group on localhost); each
process runs every scenario in ``SCENARIOS`` with its own latents and saves what it got. The test
then compares each process's rows with one single-process ``select_noise`` of the concatenated
global batch (the same assignment, identical noise), and checks the seed broadcast, unequal
batches, mixed shapes, a joint fallback and a killed peer (the survivor stops with
``CollectiveError`` inside its timeout, it does not hang).
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import immiscible

WORLD = 2
COLLECTIVE_TIMEOUT = 10.0
STALL = 2.0          # seconds rank 1 sleeps before it dies (well above STALL_TIMEOUT: a busy CI machine)
STALL_TIMEOUT = 0.3  # rank 0's collective timeout meanwhile

#: name -> (select_noise keywords, per-rank latent shapes, dtype, per-rank seeds).
SCENARIOS = {
    "assign-unequal": (dict(k=2, mode="assign"), [(2, 4, 16, 16), (3, 4, 16, 16)], torch.float32, [11, 99]),
    "assign-cosine-bf16": (dict(k=3, mode="assign", metric="cosine"), [(1, 4, 8, 8), (2, 4, 8, 8)], torch.bfloat16, [5, 5]),
    "assign-coarse": (dict(k=2, mode="assign", coarse=4), [(2, 4, 16, 16), (2, 4, 16, 16)], torch.float32, [7, 8]),
    "assign-mixed-shapes": (dict(k=2, mode="assign"), [(2, 4, 8, 8), (1, 4, 8, 12)], torch.float32, [3, 4]),
    "assign-large-d": (dict(k=2, mode="assign"), [(1, 4, 64, 64), (1, 4, 64, 64)], torch.float16, [21, 22]),
    "knn": (dict(k=4, mode="knn"), [(2, 4, 8, 8), (1, 4, 8, 8)], torch.float32, [1, 2]),
    "seed-none": (dict(k=2, mode="assign"), [(2, 4, 8, 8), (2, 4, 8, 8)], torch.float32, [None, None]),
}


def latents_for(name: str, rank: int) -> torch.Tensor:
    _, shapes, dtype, _ = SCENARIOS[name]
    gen = torch.Generator().manual_seed(1000 * list(SCENARIOS).index(name) + rank)
    return torch.randn(shapes[rank], generator=gen).to(dtype)


def outcome(call) -> dict:
    try:
        noise, info = call()
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"noise": noise, "index": info.index, "seed": info.seed, "rows": info.rows, "scope": info.scope,
            "reduction": info.reduction, "distance": info.distance, "coarse_reduction": info.coarse_reduction}


def worker(rank: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    results = {}
    for name, (kw, _, _, seeds) in SCENARIOS.items():
        torch.manual_seed(500 + rank)   # seed=None: each rank would draw its own; rank 0's must win
        latents = latents_for(name, rank)
        results[name] = outcome(lambda: immiscible.select_noise(latents, seed=seeds[rank], return_info=True,
                                                                group=dist.group.WORLD, timeout=COLLECTIVE_TIMEOUT,
                                                                **kw))
    # a local failure on one rank: every rank falls back for the batch, none waits
    bad = latents_for("knn", rank).repeat(1, 1, 1, 1)
    if rank == 1:
        bad[0, 0, 0, 0] = float("nan")
    results["joint-fallback"] = outcome(lambda: immiscible.select_noise(bad, 2, seed=1, mode="assign", return_info=True,
                                                                        group=dist.group.WORLD,
                                                                        timeout=COLLECTIVE_TIMEOUT))
    # the group still works after a joint fallback
    results["after-fallback"] = outcome(lambda: immiscible.select_noise(latents_for("knn", rank), 2, seed=1,
                                                                        mode="assign", return_info=True,
                                                                        group=dist.group.WORLD,
                                                                        timeout=COLLECTIVE_TIMEOUT))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if rank == 1:
        time.sleep(STALL)   # a peer that stalls, then dies: rank 0 must stop both times, never hang
        os._exit(3)
    faults = {}
    for fault, timeout in (("stalled", STALL_TIMEOUT), ("killed", COLLECTIVE_TIMEOUT)):
        start = time.monotonic()
        faults[fault] = outcome(lambda: immiscible.select_noise(latents_for("knn", 0), 2, seed=1, mode="assign",
                                                                return_info=True, group=dist.group.WORLD,
                                                                timeout=timeout))
        faults[fault]["seconds"] = time.monotonic() - start
        time.sleep(STALL)
    torch.save(faults, os.path.join(out, "faults.pt"))
    os._exit(0)   # the group is unusable: no destroy_process_group (it would wait for the dead peer)


# --------------------------------------------------------------------------- the test side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gloo"))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), out], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank of the gloo harness hung")
    for r in range(WORLD):
        assert os.path.exists(os.path.join(out, f"rank{r}.pt")), f"rank {r} failed:\n{logs[r]}"
    assert procs[1].returncode == 3 and procs[0].returncode == 0, logs
    return ([torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)],
            torch.load(os.path.join(out, "faults.pt"), weights_only=False))


def single_process(name: str, seed: int):
    kw = SCENARIOS[name][0]
    return immiscible.select_noise(torch.cat([latents_for(name, r) for r in range(WORLD)]), seed=seed,
                                   return_info=True, **kw)


@pytest.mark.parametrize("name", ["assign-unequal", "assign-cosine-bf16", "assign-large-d", "knn"])
def test_global_equals_single_process(runs, name):
    ranks, _ = runs
    seed = SCENARIOS[name][3][0]
    noise, info = single_process(name, seed)
    start = 0
    for r, result in enumerate(ranks):
        got = result[name]
        assert "error" not in got, got
        stop = start + SCENARIOS[name][1][r][0]
        assert got["rows"] == (start, stop) and got["scope"] == "global"
        assert got["seed"] == seed
        assert torch.equal(got["noise"], noise[start:stop]), f"rank {r}: noise differs from the single-process rows"
        if SCENARIOS[name][0]["mode"] == "assign":
            assert torch.equal(got["index"], info.index)   # the whole global assignment on every rank
            assert got["reduction"] == pytest.approx(info.reduction, abs=1e-6)  # the global batch's
        else:
            assert torch.equal(got["index"], info.index[start:stop])
        start = stop


def test_global_assignment_is_one_permutation_of_the_pool(runs):
    ranks, _ = runs
    index = ranks[0]["assign-unequal"]["index"]
    assert len(set(index.tolist())) == index.numel() == 5
    assert int(index.max()) < 2 * 5
    merged = torch.cat([r["assign-unequal"]["noise"] for r in ranks])
    assert not any(torch.equal(merged[i], merged[j]) for i in range(5) for j in range(i))


def test_coarse_global_equals_single_process(runs):
    ranks, _ = runs
    noise, info = single_process("assign-coarse", 7)
    assert torch.equal(torch.cat([r["assign-coarse"]["noise"] for r in ranks]), noise)
    assert all(torch.equal(r["assign-coarse"]["index"], info.index) for r in ranks)
    # full-resolution statistics from the pool's moments, coarse ones as solved
    assert ranks[1]["assign-coarse"]["reduction"] == pytest.approx(info.reduction, abs=1e-5)
    assert ranks[1]["assign-coarse"]["coarse_reduction"] == pytest.approx(info.coarse_reduction, abs=1e-6)


def test_mixed_shapes_solve_each_shape_among_itself(runs):
    ranks, _ = runs
    for r, result in enumerate(ranks):   # each shape is on one rank here: its own batch, rank 0's seed
        noise, _ = immiscible.select_noise(latents_for("assign-mixed-shapes", r), 2, seed=3, mode="assign",
                                           return_info=True)
        assert torch.equal(result["assign-mixed-shapes"]["noise"], noise)


def test_seed_comes_from_rank_0(runs):
    ranks, _ = runs
    assert ranks[0]["assign-unequal"]["seed"] == ranks[1]["assign-unequal"]["seed"] == 11
    seeds = {r["seed-none"]["seed"] for r in ranks}
    assert len(seeds) == 1   # each rank drew its own seed; rank 0's was used by both
    torch.manual_seed(500)
    assert seeds == {immiscible.draw_seed()}
    noise, _ = single_process("seed-none", seeds.pop())
    assert torch.equal(torch.cat([r["seed-none"]["noise"] for r in ranks]), noise)


def test_local_failure_is_a_joint_fallback(runs):
    ranks, _ = runs
    assert ranks[1]["joint-fallback"]["error"] == "ValueError" and "latents" in ranks[1]["joint-fallback"]["message"]
    assert ranks[0]["joint-fallback"]["error"] == "PeerSelectionError"
    assert "rank(s) [1]" in ranks[0]["joint-fallback"]["message"]
    assert all("error" not in r["after-fallback"] for r in ranks)


def test_stalled_or_killed_peer_stops_the_survivor(runs):
    _, faults = runs
    stalled, killed = faults["stalled"], faults["killed"]
    assert stalled["error"] == "CollectiveError", stalled
    assert "rank 0" in stalled["message"] and "unusable" in stalled["message"]
    assert stalled["seconds"] < STALL   # the timeout ended the wait, not the peer
    assert killed["error"] == "CollectiveError", killed
    assert "rank 0" in killed["message"] and "unusable" in killed["message"]
    assert killed["seconds"] < COLLECTIVE_TIMEOUT


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2])
