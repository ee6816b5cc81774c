"""The Triton kernels compiled ahead of time for every GPU generation, without a GPU.

    python -m immiscible_lab.kernel_report.aot [--json PATH] [--arch sm_90 ...] [--time] [--bench BENCH_JSON]

The launchers' own launches (``philox_knn.*_launch``, wrapped as ``plan.py``'s launch plans) are
built over representative shapes on the ``meta`` device, as on CUDA (``split_d=True``); Triton's
own binder turns each into the signature, constexprs and specialization attributes a GPU launch
would compile, and every distinct variant is compiled for each target with the ptxas and nvdisasm
that ship in the triton wheel. For each variant and target it reports registers, stack, shared
memory, spills, occupancy and the hot path's SASS; ``perf_model.py`` turns those into a time that
is PREDICTED, not measured. On a CUDA machine ``--time`` times the kernels beside the prediction
and ``--bench`` reads a bench JSON.
Must run without ``TRITON_INTERPRET`` (the tests run it in a subprocess).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from immiscible.kernels import philox_knn

from . import perf_model
from .plan import knn_plan, write_plan

TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_100": 100, "sm_120": 120}
MAX_REGISTERS = 128  # per thread at 4 warps: keeps at least 4 programs (16 warps) on every SM

# Representative shapes: each class of value Triton could specialize on (1, multiples of 16, odd,
# >= 2**31) and both pointer alignments, so a specialization that creeps back in shows up as a new
# variant. Sizes stay cheap: the plans are built on the meta device.
KNN_SHAPES = {"B": (1, 16), "k": (1, 5, 256, 65536), "D": (1, 7, 1029, 16384, 2**33)}
WRITE_SHAPES = {"rows": (1, 3, 4096), "D": (1, 7, 1029, 16384, 2**33)}
SEEDS = (0, 2**63 - 1)


def _meta(rows: int, numel: int, offset: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A ``[rows, numel]`` meta tensor, ``offset`` elements into its storage (offset 1: unaligned)."""
    return torch.empty(rows * numel + offset, dtype=dtype, device="meta")[offset:].view(rows, numel)


def knn_plans():
    """``(case, plan)`` for the fused scoring kernel, as the launcher plans it on a GPU."""
    for (b, k, d), offset, seed, ids, dtype in itertools.product(
            itertools.product(*KNN_SHAPES.values()), (0, 1), SEEDS, (None, "view"), philox_knn.X_DTYPES):
        sample_ids = None if ids is None else torch.empty(b + 1, dtype=torch.int64, device="meta")[1:]
        plan = knn_plan(_meta(b, d, offset, dtype), k, seed, sample_ids, split_d=True)
        yield f"B={b} k={k} D={d} offset={offset} seed={seed} ids={ids} {dtype}", plan


def write_plans():
    """``(case, plan)`` for the candidate writer."""
    for (rows, d), offset, seed, stream, dtype in itertools.product(
            itertools.product(*WRITE_SHAPES.values()), (0, 1), SEEDS, (0, 1), philox_knn.OUT_DTYPES):
        sample = torch.empty(rows, dtype=torch.int64, device="meta")
        out = _meta(rows, d, offset, dtype)
        yield (f"rows={rows} D={d} offset={offset} seed={seed} stream={stream} {dtype}",
               write_plan(out, seed, sample, sample, stream))


def launch_plans():
    return list(itertools.chain(knn_plans(), write_plans()))


@dataclass
class Variant:
    """One compiled specialization of one kernel, and the representative launches that use it."""

    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list = field(default_factory=list)
    grids: list = field(default_factory=list)


def _bind(plan, arch: int):
    """What Triton's launcher would compile for ``plan`` on ``arch``: signature, constexprs, attrs, options."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = plan.kernel
    if not hasattr(kernel, "params"):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1; run without it")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**plan.constexprs, **plan.options}
    bound, specialization, options = binder(*plan.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, kwargs


def variants(plans=None, arch: int = 90) -> list[Variant]:
    """The distinct compiled variants over ``plans`` (default: every representative launch).

    Triton 3.9 specializes the same way for every CUDA target, so one target's binder tells them apart.
    """
    found: dict[str, Variant] = {}
    for case, plan in plans if plans is not None else launch_plans():
        signature, constexprs, attrs, kwargs = _bind(plan, arch)
        key = repr((plan.kernel.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()), kwargs))
        v = found.setdefault(key, Variant(plan.kernel.__name__, signature, constexprs, attrs, kwargs))
        v.cases.append(case)
        v.grids.append(plan.grid)
    return list(found.values())


# --------------------------------------------------------------------------- compile and inspect


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(kernel: str, signature: dict, constexprs: dict, attrs: dict, kwargs: dict, arch: int) -> dict:
    """Compile one variant for ``sm_<arch>``; its resources (ptxas -v) and the hot path's SASS opcodes."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = getattr(philox_knn, kernel)
    target = GPUTarget("cuda", arch, 32)
    options = make_backend(target).parse_options(dict(kwargs))
    log, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v report (on a cold cache)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    ptxas = log.getvalue()
    used, spill, smem = _PTXAS_USED.search(ptxas), _PTXAS_SPILL.search(ptxas), _PTXAS_SMEM.search(ptxas)
    if used is None or spill is None:
        raise RuntimeError(f"no ptxas -v report for {kernel} on sm_{arch} (was the Triton cache warm?):\n{ptxas}")
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return {
        "kernel": kernel, "arch": arch, "cubin_bytes": len(cubin), "num_warps": compiled.metadata.num_warps,
        "constexprs": {fn.arg_names[path[0]]: value for path, value in constexprs.items()},
        "registers": int(used.group(1)), "stack": int(spill.group(1)), "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)), "shared_static": int(smem.group(1)) if smem else 0,
        "shared_dynamic": compiled.metadata.shared, "sass_lines": len(sass.splitlines()), **hot_path(sass),
    }


_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_PRED_OPERAND = re.compile(r"\s*!?U?P[T0-9]+\s*,")


_PHILOX_MULTIPLIERS = ("-0x2daee0ad", "-0x326172a9", "0xd2511f53", "0xcd9e8d57")  # signed as SASS prints them


def _is_philox(op: str, operands: str) -> bool:
    """A Philox round's multiply (by its constant) or its three-way XOR with the key (LUT 0x96)."""
    if op.startswith(("IMAD", "UIMAD")):
        return any(c in operands for c in _PHILOX_MULTIPLIERS)
    return op.startswith("LOP3") and operands.rstrip().endswith("0x96, !PT")


def hot_path(sass: str) -> dict:
    """Opcode counts of the hot path: the main loop's body (per step) and the rest (per program).

    Cold code is left out: a forward conditional branch that jumps over an inner loop skips a slow
    path (libdevice's Payne-Hanek reduction for sin/cos of huge arguments, never taken here).
    """
    ops, labels = [], {}
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            labels[m.group(1)] = len(ops)
        elif m := _INSTR.match(line):
            t = _TARGET.search(m.group(3))
            guarded = bool(m.group(1)) or bool(_PRED_OPERAND.match(m.group(3)))  # @P0 BRA, or BRA.U !UP0, ...
            ops.append((m.group(2), guarded, t.group(1) if t else None, m.group(3)))
    branches = [(i, labels[t], pred) for i, (op, pred, t, _) in enumerate(ops) if op.startswith("BRA") and t in labels]
    loops = [(t, i) for i, t, _ in branches if t < i]          # (first, last) instruction of each loop
    main = max(loops, key=lambda loop: loop[1] - loop[0], default=None)
    cold = set()
    for i, t, pred in branches:  # a forward branch over an inner loop (and not over the main loop)
        inner = any(i < a and b < t for a, b in loops)
        if pred and t > i and inner and not (main and i < main[0] and main[1] < t):
            cold.update(range(i + 1, t))
    idle = {i for i, t, _ in branches if t == i}                # the self-branch after EXIT
    step, program, philox = Counter(), Counter(), Counter()
    for i, (op, _, _, operands) in enumerate(ops):
        if i in cold or i in idle or op.startswith("NOP"):
            continue
        looped = main and main[0] <= i <= main[1]
        (step if looped else program)[op] += 1
        if looped and _is_philox(op, operands):
            philox[op] += 1
    return {"loop": main is not None, "step_ops": dict(step), "program_ops": dict(program), "step_philox": dict(philox),
            "cold_instructions": len(cold)}


def _warm_caches(archs) -> None:
    """What every compile recomputes otherwise: Triton's own source hash and each ptxas's version."""
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.cache import triton_key

    triton_key()
    for arch in archs:
        get_ptxas_version(arch)


def compile_all(targets: dict[str, int] = TARGETS, jobs: int | None = None) -> tuple[list[Variant], list[dict]]:
    """Every variant compiled for every target, in parallel, in a private Triton cache (so ptxas runs)."""
    import multiprocessing

    found = variants()
    work = [(v, arch) for v in found for arch in targets.values()]
    args = [(v.kernel, v.signature, v.constexprs, v.attrs, v.options, arch) for v, arch in work]
    jobs = min(len(work), jobs or os.cpu_count() or 1)
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="immiscible-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            _warm_caches(targets.values())
            if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
                results = [compile_variant(*a) for a in args]
            else:  # forked workers inherit the warm caches and the bound variants
                with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                    results = list(pool.map(compile_variant, *zip(*args)))
        finally:
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved
    for (v, _), r in zip(work, results):
        r["variant"] = found.index(v)
        r["occupancy"] = perf_model.occupancy(r["arch"], r["registers"], r["num_warps"],
                                              r["shared_static"] + r["shared_dynamic"])
    return found, results


# --------------------------------------------------------------------------- report


def resource_table(results: list[dict]) -> str:
    lines = ["| kernel | arch | registers | stack B | shared B (static + dynamic) | spill st/ld B "
             "| programs/SM | occupancy | limited by |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        occ = r["occupancy"]
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['registers']} | {r['stack']} | "
                     f"{r['shared_static']} + {r['shared_dynamic']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{occ['blocks_per_sm']} | {occ['occupancy']:.0%} | {occ['limited_by']} |")
    return "\n".join(lines)


def problems(results: list[dict]) -> list[str]:
    """What the CI gate rejects: spills, or more than MAX_REGISTERS registers per thread."""
    bad = []
    for r in results:
        where = f"{r['kernel']} sm_{r['arch']}"
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where}: spills {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
        if r["registers"] > MAX_REGISTERS:
            bad.append(f"{where}: {r['registers']} registers > {MAX_REGISTERS}")
    return bad


def time_kernels(results: list[dict], grid=perf_model.BENCH_GRID, launches: int = 20, repeats: int = 5) -> list[dict]:
    """The two kernels alone on this GPU (CUDA events over back-to-back launches of their launch plans,
    median of ``repeats``) beside their PREDICTED time."""
    import statistics

    name = perf_model.gpu_for(torch.cuda.get_device_name())
    rows = []
    for d, k, b in itertools.product(grid["D"], grid["k"], grid["B"]):
        x = torch.randn(b, d, device="cuda")
        ids = torch.arange(b, device="cuda")
        plans = {"score": knn_plan(x, k, 12345, ids),
                 "write": write_plan(torch.empty_like(x), 12345, ids, ids, 0)}
        row = {"gpu": torch.cuda.get_device_name(), "B": b, "k": k, "D": d}
        for what, plan in plans.items():
            plan.launch()  # compile, warm up
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(launches):
                    plan.launch()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / launches)
            row[f"{what}_us"] = statistics.median(times)
        row["fused_us"] = row["score_us"] + row["write_us"]
        if name is not None:
            p = perf_model.predict(b, k, d, name, results)
            row.update(model=name, predicted_score_us=p["score_us"], predicted_write_us=p["write_us"],
                       predicted_fused_us=p["fused_us"], measured_over_predicted=row["fused_us"] / p["fused_us"])
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m immiscible_lab.kernel_report.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write variants, resources and predictions as JSON here")
    p.add_argument("--arch", nargs="+", choices=sorted(TARGETS), help="targets (default: all)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: one per CPU)")
    p.add_argument("--time", action="store_true", help="also time the kernels on this CUDA GPU, beside the prediction")
    p.add_argument("--bench", metavar="BENCH_JSON",
                   help="a `python -m immiscible_lab.bench --device cuda --json` file: its rows beside the prediction")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    import triton

    targets = {a: TARGETS[a] for a in args.arch} if args.arch else TARGETS
    found, results = compile_all(targets, args.jobs)
    print(f"{len(found)} variant(s) from {sum(len(v.cases) for v in found)} representative launches, "
          f"triton {triton.__version__}, torch {torch.__version__}")
    for i, v in enumerate(found):
        print(f"  [{i}] {v.kernel}({', '.join(f'{k}: {t}' for k, t in v.signature.items())})")
    print("\n" + resource_table(results))
    predictions = perf_model.predict_all(results)
    print("\nPREDICTED, not measured (model: immiscible_lab/kernel_report/perf_model.py)\n\n"
          + perf_model.instruction_table(results) + "\n\n" + perf_model.prediction_table(predictions))
    out = {"triton": triton.__version__, "torch": torch.__version__,
           "variants": [{"kernel": v.kernel, "signature": v.signature, "launches": len(v.cases),
                         "max_grid": [max(g[i] for g in v.grids) for i in range(3)]} for v in found],
           "resources": results, "predicted": predictions, "gpus": perf_model.GPUS, "problems": problems(results)}
    if args.bench:
        with open(args.bench) as f:
            out["bench_vs_predicted"] = perf_model.compare(json.load(f), results)
        print("\n" + perf_model.comparison_table(out["bench_vs_predicted"]))
    if args.time:
        out["timed_vs_predicted"] = time_kernels(results)
        print("\n" + perf_model.timing_table(out["timed_vs_predicted"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.json}")
    for line in out["problems"]:
        print("PROBLEM:", line)
    return 1 if out["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
