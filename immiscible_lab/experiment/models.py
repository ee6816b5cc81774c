"""A small time-conditioned MLP, initialized from an explicit generator."""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1], shape (B,) -> (B, dim) (Vaswani et al., 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = 1000.0 * t[:, None].to(torch.float32) * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class MLPDenoiser(nn.Module):
    """``f(x, t)``: ``depth`` SiLU layers of width ``hidden`` on ``[x, emb(t)]``, output shaped like ``x``.

    Parameters
    ----------
    dim : int
        Data dimension D.
    hidden, depth, emb_dim : int
    generator : torch.Generator
        All weights are drawn from it (PyTorch's default ``Linear`` init), never from the global RNG.
    """

    def __init__(self, dim: int, *, hidden: int = 128, depth: int = 3, emb_dim: int = 32,
                 generator: torch.Generator):
        super().__init__()
        self.emb_dim = emb_dim
        sizes = [dim + emb_dim] + [hidden] * depth + [dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)
            b = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(b))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, timestep_embedding(t, self.emb_dim)], dim=1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.nn.functional.linear(h, w, b)
            if i < last:
                h = torch.nn.functional.silu(h)
        return h


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model``, parameter by parameter (in place on ``ema``)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
