"""GPU-only checks: the compiled Triton kernel, its memory bound, and backend choice on CUDA.

Skipped without CUDA; scripts/gpu_check.sh runs them on a lent GPU.
"""
import pytest
import torch

import immiscible
from helpers import fp64_distances_knn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_picks_triton_on_cuda():
    pytest.importorskip("triton")
    x = torch.randn(2, 4, 8, 8, device="cuda")
    _, info = immiscible.select_noise(x, 4, seed=0, return_info=True)
    assert info.backend == "triton"


@pytest.mark.parametrize("shape", [(4, 4, 64, 64), (2, 16, 128, 128), (2, 4, 3, 17, 19)])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_compiled_kernel_picks_the_argmin_up_to_near_ties(shape, k):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    noise, info = immiscible.select_noise(x, k, seed=17, backend="triton", return_info=True)
    cands = immiscible.candidates(x, k, seed=17, backend="triton")
    dist = fp64_distances_knn(x, cands)
    best = dist.min(1).values
    chosen = dist.gather(1, info.index[:, None])[:, 0]
    # libdevice's transcendental functions differ from the reference by a few ulp: allow near-ties
    assert torch.all(chosen - best <= 1e-5 * best + 1e-2)
    assert torch.equal(noise, cands[torch.arange(shape[0], device="cuda"), info.index].to(x.dtype))


@pytest.mark.parametrize("plan_of", ["knn", "write"])
def test_compiled_kernels_keep_to_the_aot_resource_gate_on_this_gpu(plan_of):
    # tests/test_aot.py checks every architecture's ptxas report without a GPU; this is the driver's
    # view of the one at hand.
    pytest.importorskip("triton")
    from immiscible_lab.kernel_report import aot, plan as plans

    x = torch.randn(4, 65536, device="cuda")
    ids = torch.arange(4, device="cuda")
    plan = (plans.knn_plan(x, 64, 1, ids) if plan_of == "knn"
            else plans.write_plan(torch.empty_like(x), 1, ids, ids, 0))
    kernel = plan.launch()
    torch.cuda.synchronize()
    assert kernel.n_spills == 0 and kernel.n_regs <= aot.MAX_REGISTERS, (kernel.n_regs, kernel.n_spills)


def test_torch_backend_runs_on_cuda():
    x = torch.randn(3, 4, 16, 16, device="cuda")
    noise, info = immiscible.select_noise(x, 8, seed=1, backend="torch", return_info=True)
    cands = immiscible.candidates(x, 8, seed=1, backend="torch")
    assert noise.device.type == "cuda" and torch.equal(info.index, fp64_distances_knn(x, cands).argmin(1))


@pytest.mark.parametrize("k", [4, 256])
def test_triton_extra_memory_is_at_most_two_latent_batches(k):
    b, d = 16, 65536
    x = torch.randn(b, d, device="cuda")
    immiscible.select_noise(x, k, seed=0, backend="triton")  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    immiscible.select_noise(x, k, seed=1, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 2 * b * d * 4, f"extra {extra} bytes > 2*B*D floats at k={k}"
