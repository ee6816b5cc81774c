"""Batch linear assignment (Immiscible Diffusion, Li et al., NeurIPS 2024)."""
from __future__ import annotations

import torch


def linear_assignment(cost: torch.Tensor) -> torch.Tensor:
    """Distinct column per row minimizing the total cost of a ``[B, P]`` matrix, ``P >= B``.

    Returns a LongTensor ``[B]`` of column indices on ``cost``'s device. Solved exactly on the CPU
    in float64 by ``scipy.optimize.linear_sum_assignment`` (rectangular Jonker-Volgenant).
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "mode='assign' needs scipy: pip install 'immiscible-diffusion[assign]' (or: pip install scipy)"
        ) from exc
    rows, cols = linear_sum_assignment(cost.detach().to("cpu", torch.float64).numpy())
    index = torch.empty(cost.shape[0], dtype=torch.long)
    index[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return index.to(cost.device)
