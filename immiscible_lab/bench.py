"""Benchmark: naive materialized KNN vs the torch backend vs the fused Triton kernel, in one run.

    python -m immiscible_lab.bench [--quick] [--device cpu|cuda] [--json PATH]

Prints a table of median time and peak extra memory per implementation, with ratios to the
naive baseline (which materializes ``[B, k, D]`` candidates and scores them in fp32, as
OneTrainer PR #1260 and sd-scripts PR #1395 do), and writes the same figures as JSON with the
device, torch and triton versions. Each implementation's correctness is checked before it is
timed. Compare ratios, not absolute times: these machines are noisy.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from immiscible import candidates, select_noise

FULL_GRID = {"B": (1, 4, 16), "k": (4, 64, 256), "D": (16384, 65536, 262144)}
QUICK_GRID = {"B": (1, 16), "k": (4, 256), "D": (16384, 65536)}
NAIVE_MAX_BYTES = 6 * 2**30  # skip the naive baseline beyond this (it needs ~2x this in RAM)


# --------------------------------------------------------------------------- implementations


def naive_knn(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Materialize all ``[B, k, D]`` candidates, fp32 squared distances, gather the arg-min."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cands = torch.randn(x.shape[0], k, x.shape[1], generator=gen, device=x.device)
    dist = (cands - x[:, None, :]).square_().sum(-1)
    return cands[torch.arange(x.shape[0], device=x.device), dist.argmin(1)]


def _impls(device: str) -> dict[str, Callable]:
    impls = {
        "naive": naive_knn,
        "torch": lambda x, k, seed: select_noise(x, k, seed=seed, backend="torch"),
    }
    if device == "cuda":
        try:
            import triton  # noqa: F401

            impls["triton"] = lambda x, k, seed: select_noise(x, k, seed=seed, backend="triton")
        except ImportError:
            pass
    return impls


# --------------------------------------------------------------------------- measurement


def _return_freed_memory_to_the_os() -> None:
    """Make glibc serve every allocation of 64 KiB or more by mmap, so RSS tracks live tensors.

    Without this, glibc's dynamic mmap threshold keeps freed buffers in the heap and a
    peak-RSS reading says nothing about the block being measured.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak extra memory of a block: CUDA allocator stats, or the process's VmHWM on Linux."""

    def __init__(self, device: str):
        self.device = device
        if device != "cuda":
            _return_freed_memory_to_the_os()

    @staticmethod
    def _rss_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
        raise OSError(field)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            self.base = self._rss_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = self._rss_kib("VmHWM:") * 1024 - self.base


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_median(fn: Callable, device: str, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator, page faults
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable, device: str) -> int | None:
    try:
        with _PeakMemory(device) as mem:
            fn()
        return max(0, mem.peak)
    except OSError:
        return None


def check_correct(name: str, device: str) -> None:
    """Each selector picks the fp64 arg-min of its own candidates (naive is correct by construction)."""
    if name == "naive":
        return
    x = torch.randn(2, 4, 16, 16, device=device)
    backend = name
    noise, info = select_noise(x, 8, seed=3, backend=backend, return_info=True)
    cands = candidates(x, 8, seed=3, backend=backend).double().flatten(2)
    dist = (cands - x.double().flatten(1)[:, None]).square().sum(-1)
    if not torch.equal(info.index, dist.argmin(1)):
        raise AssertionError(f"{name}: selection is not the fp64 arg-min of its candidates")


def fp16_cdist_failure(device: str, numel: int = 262144, k: int = 64) -> dict:
    """How the fp16 cdist of earlier implementations fails at Flux size: finite distances, index 0."""
    x = torch.randn(1, 1, numel, device=device).half()
    cands = torch.randn(1, k, numel, device=device).half()
    try:
        dist = torch.cdist(x, cands)
    except RuntimeError as exc:  # some CPU builds have no fp16 cdist
        return {"D": numel, "k": k, "error": str(exc)}
    return {"D": numel, "k": k, "finite_fraction": float(torch.isfinite(dist).float().mean()),
            "argmin": int(dist.argmin())}


# --------------------------------------------------------------------------- driver


def environment(device: str) -> dict:
    env = {"date": _dt.date.today().isoformat(), "device": device, "torch": torch.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env["cpus"] = os.cpu_count()
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def run(grid: dict, device: str, repeats: int, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    impls = _impls(device)
    for name in impls:
        check_correct(name, device)
    configs = [(b, k, d) for d in grid["D"] for k in grid["k"] for b in grid["B"]]
    rows = []
    for b, k, d in tqdm(configs, desc="bench", disable=not progress):
        x = torch.randn(b, d, device=device)
        naive_bytes = b * k * d * 4
        for name, impl in impls.items():
            row = {"B": b, "k": k, "D": d, "impl": name}
            if name == "naive" and naive_bytes > NAIVE_MAX_BYTES:
                row["skipped"] = f"needs {naive_bytes / 2**30:.1f} GiB of candidates"
                rows.append(row)
                continue
            fn = lambda impl=impl: impl(x, k, 1234)  # noqa: E731
            row["peak_extra_mib"] = (peak_extra_bytes(fn, device) or 0) / 2**20
            row["median_ms"] = 1e3 * time_median(fn, device, repeats)
            row["elements_per_s"] = b * k * d / (row["median_ms"] / 1e3)
            rows.append(row)
    naive = {(r["B"], r["k"], r["D"]): r for r in rows if r["impl"] == "naive" and "median_ms" in r}
    for r in rows:
        ref = naive.get((r["B"], r["k"], r["D"]))
        if ref and "median_ms" in r:
            r["speedup_vs_naive"] = ref["median_ms"] / r["median_ms"]
            r["memory_vs_naive"] = r["peak_extra_mib"] / max(ref["peak_extra_mib"], 1e-9)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'B':>3} {'k':>4} {'D':>7} {'impl':>7} {'median ms':>10} {'peak MiB':>9} {'x naive':>8} {'mem/naive':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['B']:>3} {r['k']:>4} {r['D']:>7} {r['impl']:>7}   skipped: {r['skipped']}")
            continue
        speed = f"{r['speedup_vs_naive']:.2f}" if "speedup_vs_naive" in r else "-"
        mem = f"{r['memory_vs_naive']:.3f}" if "memory_vs_naive" in r else "-"
        lines.append(f"{r['B']:>3} {r['k']:>4} {r['D']:>7} {r['impl']:>7} {r['median_ms']:>10.2f} "
                     f"{r['peak_extra_mib']:>9.1f} {speed:>8} {mem:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m immiscible_lab.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 2x2x2 grid and 3 repeats instead of 3x3x3 and 5")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", metavar="PATH", help="write the environment and every row as JSON here")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (median reported)")
    p.add_argument("--B", type=int, nargs="+", help="batch sizes (overrides the grid)")
    p.add_argument("--k", type=int, nargs="+", help="candidates per sample (overrides the grid)")
    p.add_argument("--D", type=int, nargs="+", help="elements per sample (overrides the grid)")
    args = p.parse_args(argv)
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for key in ("B", "k", "D"):
        if getattr(args, key):
            grid[key] = tuple(getattr(args, key))
    repeats = args.repeats or (3 if args.quick else 5)
    env = environment(args.device)
    rows = run(grid, args.device, repeats)
    cdist = fp16_cdist_failure(args.device)
    print(f"\n{env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, triton {env['triton']}, "
          f"{env['threads']} threads, {env['date']}")
    print(format_table(rows))
    print(f"\nfp16 torch.cdist at D={cdist['D']}, k={cdist['k']}: " +
          (f"error: {cdist['error']}" if "error" in cdist else
           f"{cdist['finite_fraction']:.0%} finite distances, arg-min = {cdist['argmin']}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "grid": grid, "repeats": repeats, "rows": rows,
                       "fp16_cdist": cdist}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
