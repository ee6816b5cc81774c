"""The Triton kernels compiled for every GPU generation without a GPU (immiscible_lab/kernel_report/aot.py).

One subprocess (TRITON_INTERPRET unset, a temporary TRITON_CACHE_DIR) binds every launch the
launchers would make on CUDA over representative shapes, compiles each distinct variant for
sm_80 ... sm_120 with the ptxas in the triton wheel, and reports resources; the checks read its JSON.
The model's pure parts (occupancy, pipes, the SASS hot-path reader) are checked in-process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from immiscible_lab.kernel_report import aot, perf_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KERNELS = {"knn_partial_scores_kernel", "write_candidates_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "immiscible_lab.kernel_report.aot", "--json", str(tmp / "aot.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (tmp / "aot.json").exists(), f"aot failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((tmp / "aot.json").read_text())


def test_every_kernel_compiles_to_a_cubin_for_every_target(report):
    built = {(r["kernel"], r["arch"]) for r in report["resources"] if r["cubin_bytes"] > 0}
    assert built == {(k, a) for k in KERNELS for a in aot.TARGETS.values()}


def test_no_spills_and_at_most_128_registers_at_4_warps(report):
    for r in report["resources"]:
        assert r["num_warps"] == 4, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= aot.MAX_REGISTERS, r
    assert report["problems"] == []


def test_one_variant_per_kernel_covers_every_launch_shape(report):
    # Integer and alignment specialization is off (philox_knn.py says why): each new variant costs a
    # user's GPU a JIT compile per shape class and CI six compiles. A variant added on purpose is
    # compiled here automatically; raise this count with it.
    variants = report["variants"]
    assert sorted(v["kernel"] for v in variants) == sorted(KERNELS)
    knn = next(v for v in variants if v["kernel"] == "knn_partial_scores_kernel")
    assert knn["max_grid"][2] > 1, "no representative launch split D across programs (splits > 1)"
    assert knn["signature"]["D"] == "i64" and knn["signature"]["seed"] == "i64"
    for v in variants:  # CUDA's grid limits, up to 2**33 elements per sample and k = 65536
        assert v["max_grid"][0] < 2**31 and max(v["max_grid"][1:]) <= 65535, v


def test_the_hot_loop_is_found_and_holds_philox(report):
    for r in report["resources"]:
        assert r["loop"] and r["step_philox"], r["kernel"]
        assert r["cold_instructions"] == 0, "a slow path (libdevice sin/cos?) came back"


def test_predictions_cover_the_bench_grid(report):
    rows = report["predicted"]
    assert len(rows) == 27 * len(perf_model.PREDICTED_GPUS)
    for p in rows:
        assert 0 < p["philox_floor_us"] < p["fused_us"], p
        assert p["naive_floor_us"] < p["naive_us"]


# --------------------------------------------------------------------------- the model's pure parts


@pytest.mark.parametrize("arch, registers, blocks", [(90, 96, 5), (90, 64, 8), (80, 72, 7), (89, 64, 8),
                                                     (86, 32, 12), (80, 32, 16), (90, 128, 4), (89, 255, 2)])
def test_occupancy_follows_the_register_file_per_subpartition(arch, registers, blocks):
    assert perf_model.occupancy(arch, registers, 4, 64)["blocks_per_sm"] == blocks


def test_the_cycle_model_charges_each_step_to_its_busiest_pipe():
    # uniform-datapath and control instructions take an issue slot and no pipe
    assert perf_model.cycles({"UIADD3": 10, "BRA": 5}, 90) == (15, "issue")
    # A100 has half the FP32 lanes per SMSP: an FFMA stream takes twice as long there and is pipe-bound
    a100, ga10x = perf_model.cycles({"FFMA.FTZ": 64}, 80), perf_model.cycles({"FFMA.FTZ": 64}, 86)
    assert a100 == (2 * ga10x[0], "fma") and ga10x[0] == 64
    # a 32-bit multiply-high (Philox's) takes two IMAD slots: twice a plain IMAD, and IMAD-bound
    hi, mov = perf_model.cycles({"IMAD.HI.U32": 8}, 90), perf_model.cycles({"IMAD.MOV.U32": 8}, 90)
    assert hi == (2 * mov[0], "imad") and hi[0] > 8
    # IMAD shares the FMA pipe: FFMAs with IMADs take longer than FFMAs with as many logic ops (ALU pipe)
    assert perf_model.cycles({"FFMA": 32, "IMAD": 32}, 80) == (128, "fma")
    assert perf_model.cycles({"FFMA": 32, "LOP3.LUT": 32}, 80)[0] == 64
    # transcendentals (MUFU) run at 1/8 rate: a few of them bind a step full of cheap work
    assert perf_model.cycles({"MUFU.LG2": 4, "FFMA": 8}, 90) == (32, "xu")


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   IMAD.HI.U32 R2, R0, -0x326172a9, RZ ;
        /*0020*/                   LOP3.LUT R3, R2, UR4, R5, 0x96, !PT ;
        /*0030*/              {guarded_branch} ;
.L_x_3:
        /*0040*/                   LDG.E.CONSTANT R7, desc[UR6][R4.64] ;
        /*0050*/               @P0 BRA `(.L_x_3) ;
.L_x_2:
        /*0060*/                   FFMA R6, R3, R3, R6 ;
        /*0070*/              @!P2 BRA `(.L_x_1) ;
        /*0080*/                   STG.E desc[UR6][R8.64], R6 ;
        /*0090*/                   EXIT ;
.L_x_4:
        /*00a0*/                   BRA `(.L_x_4);
        /*00b0*/                   NOP;
"""


@pytest.mark.parametrize("guarded_branch", ["@!P1 BRA `(.L_x_2)", "BRA.U !UP0, `(.L_x_2)"])  # sm_90, sm_120 forms
def test_hot_path_counts_the_main_loop_and_skips_slow_paths(guarded_branch):
    hot = aot.hot_path(SASS.replace("{guarded_branch}", guarded_branch))
    assert hot["loop"] and hot["cold_instructions"] == 2
    forward = guarded_branch.split()[1] if guarded_branch.startswith("@") else guarded_branch.split()[0]
    expected = {"IMAD.HI.U32": 1, "LOP3.LUT": 1, "FFMA": 1, "BRA": 1}  # BRA: the loop's back-branch
    expected[forward] = expected.get(forward, 0) + 1
    assert hot["step_ops"] == expected
    assert hot["program_ops"] == {"S2R": 1, "STG.E": 1, "EXIT": 1}
    assert hot["step_philox"] == {"IMAD.HI.U32": 1, "LOP3.LUT": 1}
