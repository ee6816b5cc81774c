"""One kernel launch, worked out without launching: what the launcher runs, as an object.

The grid, arguments and constexprs come from the kernel module's own ``*_launch`` functions (the
ones its launchers call), so what ``aot.py`` binds and compiles is what a GPU runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from immiscible.kernels import philox_knn


@dataclass(frozen=True)
class LaunchPlan:
    kernel: Any                    # the @triton.jit function
    grid: tuple[int, int, int]
    args: tuple                    # runtime arguments, in the kernel's order
    constexprs: dict[str, int]
    outputs: tuple = ()            # tensors the launch fills
    options: dict = field(default_factory=lambda: dict(philox_knn.OPTIONS))

    def launch(self):
        """Run it; returns Triton's compiled kernel (``n_regs``, ``n_spills`` on a GPU)."""
        return self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def knn_plan(x: torch.Tensor, k: int, seed: int, sample_ids: torch.Tensor | None = None, *,
             split_d: bool | None = None) -> LaunchPlan:
    """The launch of ``philox_knn.knn_partial_scores``; outputs ``(nn, xn)``, each ``[B, k, splits]``."""
    grid, args, constexprs, outputs = philox_knn.knn_partial_scores_launch(x, k, seed, sample_ids, split_d=split_d)
    return LaunchPlan(philox_knn.knn_partial_scores_kernel, grid, args, constexprs, outputs)


def write_plan(out: torch.Tensor, seed: int, sample: torch.Tensor, index: torch.Tensor, stream: int) -> LaunchPlan:
    """The launch of ``philox_knn.write_candidates`` (``out`` has at least one row)."""
    grid, args, constexprs, outputs = philox_knn.write_candidates_launch(out, seed, sample, index, stream)
    return LaunchPlan(philox_knn.write_candidates_kernel, grid, args, constexprs, outputs)
