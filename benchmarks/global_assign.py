"""What ``--immiscible_scope global`` costs against per-rank selection (mode assign).

Global scope (``immiscible/collective.py``): rank 0 scores its pool of ``k x B`` candidates against
the whole global batch ``B`` and solves one ``B x kB`` assignment; every rank regenerates its own
``B / W`` winners. Per-rank scope: each rank scores ``k x B/W`` candidates against its ``B/W``
samples and solves its own assignment, all ranks at once. This times, on this machine, at SDXL-size
latents (4 x 128 x 128 = 65536 elements) and global batches 8, 32, 128, k = 1, 2, 4:

- the global solve on rank 0, split into scoring (candidate generation and distances) and the
  assignment itself (scipy), plus one rank's regeneration of its winners;
- the per-rank selection of ``B / W`` samples (what every rank does under scope rank);
- for one configuration, ``select_noise(..., group=)`` on a one-process gloo group against plain
  ``select_noise`` on the same batch: the protocol's own overhead (headers, byte packing, copies).

Gloo on a CPU says nothing about NCCL, so the gather is *modelled*: the bytes rank 0 receives,
``(W - 1) / W x B x 65536 x bytes per element``, over each stated link bandwidth (latency left out).

    python benchmarks/global_assign.py [--world 8] [--repeats 3] [--json benchmarks/global_assign.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch

import immiscible
from immiscible.backends import TorchBackend
from immiscible.select import assigned

SHAPE = (4, 128, 128)   # SDXL 1024 px latent
BATCHES = (8, 32, 128)
KS = (1, 2, 4)
#: name -> bytes per second, sustained, one direction into rank 0.
LINKS = {
    "NVLink 4 (H100 SXM), 300 GB/s": 300e9,
    "PCIe 4.0 x16, 25 GB/s": 25e9,
    "100 Gb/s InfiniBand, 12.5 GB/s": 12.5e9,
    "10 GbE, 1.25 GB/s": 1.25e9,
}


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def global_parts(x: torch.Tensor, k: int, world: int, repeats: int) -> dict:
    """Rank 0's scoring and assignment of the whole batch, and one rank's regeneration of its winners."""
    batch = x.shape[0]
    backend = TorchBackend(1234, list(range(batch)))
    pool = k * batch
    holder = {}

    def score():
        holder["scored"] = backend.pool_scores(x, pool, None)

    def solve():
        holder["index"] = assigned(holder["scored"], "l2")

    score_s = timed(score, repeats)
    solve_s = timed(solve, repeats)
    mine = holder["index"][: max(1, batch // world)].tolist()
    regen_s = timed(lambda: backend.pool_members(torch.empty(len(mine), x.shape[1]), pool, mine), repeats)
    return {"score_s": score_s, "assign_s": solve_s, "regenerate_s": regen_s}


def protocol_overhead(latents: torch.Tensor, k: int, repeats: int) -> dict:
    """``select_noise(group=)`` on a one-process gloo group against ``select_noise`` (same batch, same result)."""
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            plain = lambda: immiscible.select_noise(latents, k, seed=5, mode="assign", backend="torch")  # noqa: E731
            grouped = lambda: immiscible.select_noise(latents, k, seed=5, mode="assign", backend="torch",  # noqa: E731
                                                      group=dist.group.WORLD)
            assert torch.equal(plain(), grouped())
            a, b = timed(plain, repeats), timed(grouped, repeats)
        finally:
            dist.destroy_process_group()
    return {"batch": latents.shape[0], "k": k, "plain_s": a, "group_s": b, "ratio": b / a}


def gather_model(batch: int, world: int, coarse: int | None = None) -> dict:
    """Bytes into rank 0 and seconds per link (bf16 latents; fp32 doubles it; coarse: fp32 pooled)."""
    elements = SHAPE[0] * coarse * coarse if coarse else SHAPE[0] * SHAPE[1] * SHAPE[2]
    per_elem = 4 if coarse else 2
    received = (world - 1) / world * batch * elements * per_elem
    return {"bytes": received, "seconds": {name: received / bw for name, bw in LINKS.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=8, help="processes the global batch is split over (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after one warm-up (default 3)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, *SHAPE, generator=gen)
        flat = x.reshape(batch, -1)
        per_rank = max(1, batch // a.world)
        for k in KS:
            parts = global_parts(flat, k, a.world, a.repeats)
            rank_s = timed(lambda: immiscible.select_noise(x[:per_rank], k, seed=9, mode="assign", backend="torch"),
                           a.repeats)
            global_s = parts["score_s"] + parts["assign_s"] + parts["regenerate_s"]
            rows.append({"batch": batch, "k": k, "per_rank_batch": per_rank, **parts, "global_s": global_s,
                         "rank_s": rank_s, "global_over_rank": global_s / rank_s,
                         "gather": gather_model(batch, a.world), "gather_coarse8": gather_model(batch, a.world, 8)})
            print(f"  B={batch:4d} k={k}: global {global_s * 1e3:9.1f} ms, per-rank {rank_s * 1e3:8.1f} ms", flush=True)
    overhead = protocol_overhead(torch.randn(32, *SHAPE, generator=gen), 4, a.repeats)

    print(f"\nmode assign, latents {'x'.join(map(str, SHAPE))} fp32, W = {a.world} processes, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'B':>4} {'k':>2} {'B/W':>4} | {'score':>9} {'assign':>9} {'regen':>8} {'global':>9} | {'per-rank':>9} "
          f"{'ratio':>6} | gather bf16 (MB) " + " ".join(f"{n.split(',')[0]:>12}" for n in LINKS))
    for r in rows:
        g = r["gather"]
        print(f"{r['batch']:4d} {r['k']:2d} {r['per_rank_batch']:4d} | {r['score_s'] * 1e3:7.1f}ms "
              f"{r['assign_s'] * 1e3:7.2f}ms {r['regenerate_s'] * 1e3:6.1f}ms {r['global_s'] * 1e3:7.1f}ms | "
              f"{r['rank_s'] * 1e3:7.1f}ms {r['global_over_rank']:6.1f} | {g['bytes'] / 1e6:16.1f} "
              + " ".join(f"{s * 1e3:10.2f}ms" for s in g["seconds"].values()))
    print(f"\nprotocol overhead, one-process gloo group, B={overhead['batch']} k={overhead['k']}: "
          f"{overhead['group_s'] * 1e3:.1f} ms against {overhead['plain_s'] * 1e3:.1f} ms ({overhead['ratio']:.3f}x)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                       "shape": SHAPE, "world": a.world, "repeats": a.repeats, "links_bytes_per_s": LINKS,
                       "rows": rows, "protocol_overhead": overhead}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
