"""Benchmark: naive materialized KNN vs the torch backend vs the fused Triton kernel, in one run.

    python -m immiscible_lab.bench [--quick] [--device cpu|cuda] [--json PATH] [--coarse N]

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
#: Time of the torch backend over naive that each shape must stay within (issue 8): 1.25x at the
#: grid's shapes, CIFAR-10's pixel space (D=3072) and B=1 at SDXL size; 5x at the demo's D=64,
#: where one generator seeding per sample (what keys candidates by sample id) costs more than
#: naive's whole draw.
BOUND = 1.25
SMALL_D_BOUND = 5.0
EXTRA_BOUND_SHAPES = [(128, 4, 3072), (128, 16, 3072), (128, 64, 3072), (1, 4, 65536),
                      (128, 4, 64), (128, 16, 64), (128, 64, 64)]
QUICK_GRID = {"B": (1, 16), "k": (4, 256), "D": (16384, 65536)}
NAIVE_MAX_BYTES = 6 * 2**30  # skip the naive baseline beyond this (it needs ~2x this in RAM)


# --------------------------------------------------------------------------- implementations


def naive_knn(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Materialize all ``[B, k, D]`` candidates, fp32 squared distances, gather the arg-min."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cands = torch.randn(x.shape[0], k, x.shape[1], generator=gen, device=x.device)
    dist = (cands - x[:, None, :]).square_().sum(-1)
    return cands[torch.arange(x.shape[0], device=x.device), dist.argmin(1)]


def image_shape(numel: int, side_at_least: int = 1) -> tuple[int, int, int] | None:
    """``(C, H, H)`` with ``C * H * H == numel``, C one of 16, 4, 3, 1 (latent or pixel channels); None if none fits."""
    for channels in (16, 4, 3, 1):
        side = round((numel // channels) ** 0.5)
        if channels * side * side == numel and side >= side_at_least:
            return channels, side, side
    return None


def _coarse(n: int) -> Callable:
    """Coarse selection (``coarse=n``) on the flat latents viewed as ``[B, C, H, H]``."""
    def select(x, k, seed, backend="torch"):
        return select_noise(x.view(x.shape[0], *image_shape(x.shape[1], n)), k, seed=seed, backend=backend, coarse=n)
    return select


def _impls(device: str, coarse: int | None = None) -> dict[str, Callable]:
    impls = {
        "naive": naive_knn,
        "torch": lambda x, k, seed: select_noise(x, k, seed=seed, backend="torch"),
    }
    if coarse:
        impls[f"coarse{coarse}"] = _coarse(coarse)
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
    """Each selector picks the fp64 arg-min of its own candidates (naive is correct by construction;
    coarse variants are checked against a float64 reference in tests/test_coarse.py)."""
    if name == "naive" or name.startswith("coarse"):
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


def run(grid: dict, device: str, repeats: int, progress: bool = True, coarse: int | None = None) -> list[dict]:
    from tqdm import tqdm

    impls = _impls(device, coarse)
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
            if name.startswith("coarse") and image_shape(d, coarse) is None:
                row["skipped"] = f"D={d} is not C x H x H with H >= {coarse}"
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


def bound_shapes(grid: dict) -> list[tuple[int, int, int, float]]:
    """``(B, k, D, bound)`` for every shape of ``grid`` and the extra shapes."""
    shapes = [(b, k, d) for d in grid["D"] for k in grid["k"] for b in grid["B"]]
    shapes += [s for s in EXTRA_BOUND_SHAPES if s not in shapes]
    return [(b, k, d, SMALL_D_BOUND if d <= 64 else BOUND) for b, k, d in shapes]


def check_bounds(shapes, device: str, repeats: int, progress: bool = True) -> list[dict]:
    """Torch backend against naive, interleaved call by call, median of ``repeats`` each: PASS/FAIL."""
    from tqdm import tqdm

    impl = _impls(device)["torch"]
    rows = []
    for b, k, d, bound in tqdm(shapes, desc="bounds", disable=not progress):
        row = {"B": b, "k": k, "D": d, "bound": bound}
        if b * k * d * 4 > NAIVE_MAX_BYTES:
            row.update(verdict="n/a", skipped=f"naive needs {b * k * d * 4 / 2**30:.1f} GiB of candidates")
            rows.append(row)
            continue
        x = torch.randn(b, d, device=device)
        fns = {"naive": lambda: naive_knn(x, k, 1234), "torch": lambda: impl(x, k, 1234)}
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
        naive_ms, torch_ms = (1e3 * statistics.median(times[n]) for n in ("naive", "torch"))
        ratio = torch_ms / naive_ms
        row.update(naive_ms=naive_ms, torch_ms=torch_ms, ratio=ratio, verdict="PASS" if ratio <= bound else "FAIL")
        rows.append(row)
    return rows


def format_bounds(rows: list[dict]) -> str:
    head = f"{'B':>4} {'k':>4} {'D':>7} {'naive ms':>10} {'torch ms':>10} {'torch/naive':>11} {'bound':>6}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['B']:>4} {r['k']:>4} {r['D']:>7}   {r['skipped']}")
            continue
        lines.append(f"{r['B']:>4} {r['k']:>4} {r['D']:>7} {r['naive_ms']:>10.2f} {r['torch_ms']:>10.2f} "
                     f"{r['ratio']:>11.2f} {r['bound']:>5.2f}x  {r['verdict']}")
    return "\n".join(lines)


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
    p.add_argument("--coarse", type=int, metavar="N",
                   help="also time coarse selection (coarse=N) on the latents viewed as [B, C, H, H]")
    p.add_argument("--bounds", action="store_true",
                   help="only the speed bounds: torch backend vs naive, interleaved, at the grid's shapes and the "
                        f"extra ones, PASS/FAIL against {BOUND}x ({SMALL_D_BOUND}x at D=64)")
    args = p.parse_args(argv)
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for key in ("B", "k", "D"):
        if getattr(args, key):
            grid[key] = tuple(getattr(args, key))
    repeats = args.repeats or (3 if args.quick else 5)
    env = environment(args.device)
    if args.bounds:
        repeats = max(5, args.repeats or 7)
        rows = check_bounds(bound_shapes(grid), args.device, repeats)
        print(f"\n{env['device']} ({env.get('gpu', env['cpu'])}), torch {env['torch']}, {env['threads']} threads, "
              f"{env['date']}; median of {repeats} interleaved repeats")
        print(format_bounds(rows))
        failed = [r for r in rows if r["verdict"] == "FAIL"]
        print(f"\n{len(rows) - len(failed)} of {len(rows)} shapes within their bound" +
              (f"; FAIL: {[(r['B'], r['k'], r['D']) for r in failed]}" if failed else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "repeats": repeats, "bounds": rows}, f, indent=2)
            print(f"wrote {args.json}")
        return 0
    rows = run(grid, args.device, repeats, coarse=args.coarse)
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
