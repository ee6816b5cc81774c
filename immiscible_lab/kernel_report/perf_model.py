"""Occupancy and a PREDICTED time for the kernels, from their SASS: a model, not a measurement.

Each hot-path instruction is charged to the pipe that executes it; per warp scheduler (SMSP) a
step takes as many cycles as its busiest constraint needs: one issue per cycle, and each pipe's
documented rate (CUDA C++ Programming Guide, "Arithmetic Instructions": results per clock per SM,
divided by 4 SMSPs and 32 lanes). The busiest SM gets ``ceil(programs / SMs)`` programs of 4 warps,
one per SMSP. Memory time is the kernel's DRAM bytes at peak bandwidth; a kernel takes the larger.
Assumed, not documented: enough independent work per warp to hide latency (each thread runs 8
Philox streams per step); IMAD.WIDE and IMAD.HI cost two IMAD slots; the latent tile stays in L2
across a sample's candidate blocks. Launch overhead and the small torch ops around the kernels
are not modelled. The naive baseline (``immiscible_lab.bench.naive_knn``) is modelled by its DRAM
traffic alone: randn writes 4 B per element, ``- x`` reads 4 and writes 4, ``square_`` reads 4 and
writes 4, ``sum`` reads 4: 24 B per candidate element (8 B for a fused, single-pass floor).
"""
from __future__ import annotations

import math

import torch

from .plan import knn_plan, write_plan

# Per-SM limits (CCCL cuda/__device/arch_traits.h): max warps, max blocks, shared memory (KiB).
ARCH_LIMITS = {80: (64, 32, 164), 86: (48, 16, 100), 89: (48, 24, 100), 90: (64, 32, 228),
               100: (64, 32, 228), 120: (48, 32, 100)}
REGISTERS_PER_SM, REGISTER_UNIT, SUBPARTITIONS, RESERVED_SHARED = 65536, 256, 4, 1024

# Warp instructions per clock per SMSP. fp32: FFMA/FMUL/FADD; imad: the FMA-heavy half, the only
# one that multiplies integers; A100 has 16 FP32 lanes per SMSP, the others 32 (16 heavy + 16 lite).
PIPE_RATES = {
    80: {"issue": 1.0, "fma": 0.5, "imad": 0.5, "alu": 0.5, "xu": 0.125, "lsu": 0.25},
    86: {"issue": 1.0, "fma": 1.0, "imad": 0.5, "alu": 0.5, "xu": 0.125, "lsu": 0.25},
    89: {"issue": 1.0, "fma": 1.0, "imad": 0.5, "alu": 0.5, "xu": 0.125, "lsu": 0.25},
    90: {"issue": 1.0, "fma": 1.0, "imad": 0.5, "alu": 0.5, "xu": 0.125, "lsu": 0.25},
}

# Spec-sheet figures: SMs, boost clock (GHz), peak DRAM bandwidth (GB/s). Matched by name.
GPUS = {
    "A100": {"arch": 80, "sms": 108, "clock_ghz": 1.41, "dram_gbs": 2039, "part": "A100 SXM4 80 GB"},
    "H100": {"arch": 90, "sms": 132, "clock_ghz": 1.98, "dram_gbs": 3352, "part": "H100 SXM5 80 GB"},
    "RTX 4090": {"arch": 89, "sms": 128, "clock_ghz": 2.52, "dram_gbs": 1008, "part": "GeForce RTX 4090"},
    "H200": {"arch": 90, "sms": 132, "clock_ghz": 1.98, "dram_gbs": 4800, "part": "H200 SXM 141 GB"},
}
PREDICTED_GPUS = ("A100", "H100", "RTX 4090")
BENCH_GRID = {"B": (1, 4, 16), "k": (4, 64, 256), "D": (16384, 65536, 262144)}
NAIVE_BYTES, NAIVE_FLOOR_BYTES = 24, 8


def occupancy(arch: int, registers: int, num_warps: int, shared: int) -> dict:
    """Resident programs per SM and the theoretical occupancy (as cuda_occupancy.h computes it)."""
    max_warps, max_blocks, shared_kib = ARCH_LIMITS[arch]
    regs_per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    warps_per_sub = (REGISTERS_PER_SM // SUBPARTITIONS) // regs_per_warp
    limits = {"registers": warps_per_sub * SUBPARTITIONS // (math.ceil(num_warps / SUBPARTITIONS) * SUBPARTITIONS),
              "warps": max_warps // num_warps, "blocks": max_blocks,
              "shared": shared_kib * 1024 // (shared + RESERVED_SHARED)}
    limited_by = min(limits, key=limits.get)
    blocks = limits[limited_by]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / max_warps, "limited_by": limited_by}


def pipe(op: str) -> tuple[str, int]:
    """The pipe an SASS opcode issues to, and how many of its slots it takes."""
    base = op.split(".")[0]
    if base.startswith("U") or base in ("R2UR", "S2UR"):
        return "uniform", 1
    if base in ("FFMA", "FMUL", "FADD", "FFMA32I", "FMUL32I", "FADD32I", "HFMA2", "HMUL2", "HADD2", "FSWZADD"):
        return "fma", 1
    if base in ("IMAD", "IMUL", "IDP", "IMAD32I"):
        return "imad", 2 if (".WIDE" in op or ".HI" in op) else 1
    if base in ("MUFU", "I2F", "F2I", "F2F", "FRND", "POPC", "FLO", "BREV"):
        return "xu", 1
    if base in ("LDG", "STG", "LD", "ST", "LDS", "STS", "LDL", "STL", "LDC", "SHFL", "ATOM", "ATOMS", "ATOMG",
                "RED", "REDUX", "LDGSTS", "LDSM", "MEMBAR", "CCTL"):
        return "lsu", 1
    if base in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX"):
        return "fp64", 1
    if base in ("BRA", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "BAR", "WARPSYNC", "S2R", "CS2R", "DEPBAR",
                "YIELD", "BMOV", "NANOSLEEP", "VOTE", "ELECT", "ERRBAR"):
        return "control", 1
    return "alu", 1  # integer add/logic/shift/compare/select/move, I2FP, F2FP, FSETP, FSEL, FMNMX, VIADD, ...


def pipe_slots(ops: dict) -> dict:
    """Issue count and slots per pipe of an opcode histogram (``fma`` counts the IMAD slots too)."""
    slots = {"issue": sum(ops.values())}
    for op, n in ops.items():
        name, cost = pipe(op)
        slots[name] = slots.get(name, 0) + n * cost
    slots["fma"] = slots.get("fma", 0) + slots.get("imad", 0)  # IMAD runs on the FMA-heavy half
    return slots


def cycles(ops: dict, arch: int) -> tuple[float, str]:
    """SMSP cycles one warp needs for ``ops``, and the binding constraint."""
    rates = PIPE_RATES[arch]
    need = {p: n / rates[p] for p, n in pipe_slots(ops).items() if p in rates}
    bound = max(need, key=need.get) if need else "issue"
    return need.get(bound, 0.0), bound


def normals_per_thread_step(kernel: str, constexprs: dict, num_warps: int) -> int:
    """Candidate elements one thread generates per step of the kernel's main loop."""
    tile = constexprs["BLOCK_M"] * 4 * constexprs.get("BLOCK_J", 1)
    return tile // (num_warps * 32)


def per_normal(result: dict) -> dict:
    """Instructions (and, where the pipe rates are known, SMSP cycles) per generated element; in
    the scorer every generated element is also scored."""
    n = normals_per_thread_step(result["kernel"], result["constexprs"], result["num_warps"])
    step, philox = result["step_ops"], result["step_philox"]
    slots = pipe_slots(step)
    out = {"kernel": result["kernel"], "arch": result["arch"], "normals_per_thread_step": n,
           "instructions": slots["issue"] / n, "philox_instructions": sum(philox.values()) / n,
           **{p: slots.get(p, 0) / n for p in ("fma", "imad", "alu", "xu", "lsu")}}
    if result["arch"] in PIPE_RATES:
        c, bound = cycles(step, result["arch"])
        out.update(cycles=c / n / 32, bound=bound, philox_cycles=cycles(philox, result["arch"])[0] / n / 32)
    return out


def _kernel_us(plan, result: dict, gpu: dict, dram_bytes: float) -> tuple[float, str]:
    """Predicted µs of one launch: the busiest SM's issue/pipe time or the DRAM time, the larger."""
    grid = plan.grid
    programs = grid[0] * grid[1] * grid[2]
    d4 = plan.args[6]  # both kernels take (..., D, D4, ...) at the same position
    if result["kernel"] == "knn_partial_scores_kernel":
        steps = math.ceil(min(plan.args[8], d4) / plan.constexprs["BLOCK_M"])
    else:
        steps = math.ceil(math.ceil(d4 / plan.constexprs["BLOCK_M"]) / grid[1])
    step_c, bound = cycles(result["step_ops"], result["arch"])
    prog_c, _ = cycles(result["program_ops"], result["arch"])
    per_sm = math.ceil(programs / gpu["sms"])
    compute_us = per_sm * (steps * step_c + prog_c) / (gpu["clock_ghz"] * 1e3)
    memory_us = dram_bytes / (gpu["dram_gbs"] * 1e3)
    return (compute_us, bound) if compute_us >= memory_us else (memory_us, "dram")


def predict(b: int, k: int, d: int, gpu_name: str, results: list[dict]) -> dict:
    """Predicted µs for select_noise's two kernels, naive, the naive floor and the Philox floor."""
    gpu = GPUS[gpu_name]
    by_kernel = {r["kernel"]: r for r in results if r["arch"] == gpu["arch"]}
    x = torch.empty(b, d, device="meta")
    score = knn_plan(x, k, 0, split_d=True)
    write = write_plan(x, 0, torch.empty(b, dtype=torch.int64, device="meta"),
                       torch.empty(b, dtype=torch.int64, device="meta"), 0)
    splits = score.grid[2]
    score_us, score_bound = _kernel_us(score, by_kernel["knn_partial_scores_kernel"], gpu, 4 * b * d + 8 * b * k * splits)
    write_us, _ = _kernel_us(write, by_kernel["write_candidates_kernel"], gpu, 4 * b * d)
    elements = b * k * d
    philox = per_normal(by_kernel["knn_partial_scores_kernel"])["philox_cycles"]
    floor_us = elements * philox / (gpu["sms"] * SUBPARTITIONS * gpu["clock_ghz"] * 1e3)
    naive_us = NAIVE_BYTES * elements / (gpu["dram_gbs"] * 1e3)
    fused = score_us + write_us
    return {"gpu": gpu_name, "B": b, "k": k, "D": d, "splits": splits, "programs": math.prod(score.grid),
            "score_us": score_us, "write_us": write_us, "fused_us": fused, "bound": score_bound,
            "naive_us": naive_us, "naive_floor_us": NAIVE_FLOOR_BYTES * elements / (gpu["dram_gbs"] * 1e3),
            "philox_floor_us": floor_us, "speedup_vs_naive": naive_us / fused, "vs_philox_floor": fused / floor_us}


def predict_all(results: list[dict], gpus=PREDICTED_GPUS, grid=BENCH_GRID) -> list[dict]:
    archs = {r["arch"] for r in results}
    return [predict(b, k, d, g, results) for g in gpus if GPUS[g]["arch"] in archs
            for d in grid["D"] for k in grid["k"] for b in grid["B"]]


def instruction_table(results: list[dict]) -> str:
    lines = ["| kernel | arch | instr / element | FMA-pipe slots | of which IMAD | ALU | XU (MUFU, cvt) | LSU "
             "| Philox instr | bound | SMSP cycles / element (Philox alone) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        if not r["loop"]:
            continue
        p = per_normal(r)
        timing = (f"{p['bound']} | {p['cycles']:.3f} ({p['philox_cycles']:.3f})" if "cycles" in p
                  else "(rates not modelled) | ")
        lines.append(f"| {p['kernel']} | sm_{p['arch']} | {p['instructions']:.1f} | {p['fma']:.1f} | {p['imad']:.1f} "
                     f"| {p['alu']:.1f} | {p['xu']:.2f} | {p['lsu']:.2f} | {p['philox_instructions']:.1f} | {timing} |")
    return "\n".join(lines)


def _us(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def prediction_table(predictions: list[dict]) -> str:
    gpus = list(dict.fromkeys(p["gpu"] for p in predictions))
    head = "| B | k | D | " + " | ".join(f"{g} fused µs | naive µs | × naive | × Philox floor" for g in gpus) + " |"
    lines = [head, "|" + "---:|" * (3 + 4 * len(gpus))]
    rows: dict = {}
    for p in predictions:
        rows.setdefault((p["B"], p["k"], p["D"]), []).append(p)
    for (b, k, d), ps in rows.items():
        cells = " | ".join(f"{_us(p['fused_us'])} | {_us(p['naive_us'])} | {p['speedup_vs_naive']:.1f} | "
                           f"{p['vs_philox_floor']:.1f}" for p in ps)
        lines.append(f"| {b} | {k} | {d} | {cells} |")
    return "\n".join(lines)


def gpu_for(device_name: str) -> str | None:
    """The entry of GPUS whose name ``torch.cuda.get_device_name()`` contains."""
    for name in sorted(GPUS, key=len, reverse=True):
        if name.replace("RTX ", "") in device_name:
            return name
    return None


def compare(bench: dict, results: list[dict]) -> list[dict]:
    """Measured rows of a CUDA bench JSON beside the prediction for that GPU."""
    name = gpu_for(bench.get("environment", {}).get("gpu", ""))
    if name is None:
        return []
    out = []
    for row in bench.get("rows", []):
        if row["impl"] not in ("triton", "naive"):
            continue
        p = predict(row["B"], row["k"], row["D"], name, results)
        predicted = p["fused_us"] if row["impl"] == "triton" else p["naive_us"]
        out.append({"gpu": name, "B": row["B"], "k": row["k"], "D": row["D"], "impl": row["impl"],
                    "measured_us": row["median_ms"] * 1e3, "predicted_us": predicted,
                    "measured_over_predicted": row["median_ms"] * 1e3 / predicted})
    return out


def comparison_table(rows: list[dict]) -> str:
    if not rows:
        return "measured vs predicted: no bench rows for a GPU this model knows (" + ", ".join(GPUS) + ")"
    lines = [f"measured vs PREDICTED on {rows[0]['gpu']} (select_noise adds ~10 small torch ops to the kernels)",
             "| B | k | D | impl | measured µs | predicted µs | measured / predicted |", "|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['k']} | {r['D']} | {r['impl']} | {_us(r['measured_us'])} | "
                     f"{_us(r['predicted_us'])} | {r['measured_over_predicted']:.2f} |")
    return "\n".join(lines)


def timing_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = f"kernels timed on {rows[0]['gpu']}"
    if "model" not in rows[0]:
        return head + f" (no model for this GPU; known: {', '.join(GPUS)})\n" + "\n".join(
            f"B={r['B']} k={r['k']} D={r['D']}: score {_us(r['score_us'])} µs, write {_us(r['write_us'])} µs" for r in rows)
    lines = [head + f" beside the PREDICTED time for {rows[0]['model']}",
             "| B | k | D | score µs | predicted | write µs | predicted | measured / predicted |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['k']} | {r['D']} | {_us(r['score_us'])} | {_us(r['predicted_score_us'])} | "
                     f"{_us(r['write_us'])} | {_us(r['predicted_write_us'])} | {r['measured_over_predicted']:.2f} |")
    return "\n".join(lines)
