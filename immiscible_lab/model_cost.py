"""Benchmark: one training step of the demo's model families against a small conv net, in one run.

    python -m immiscible_lab.model_cost [--repeats N] [--json PATH]

Why the demo has no convolutional family: on a CPU a conv net that sees every pixel costs far more
per step than the residual MLP. This times one Adam step (forward, backward, update) at batch 128
on one thread for the demo's ``mlp`` and ``resmlp`` (width 256, depth 3) and for ``conv``, four
3x3 convolutions of 32 channels at full resolution with the time embedding added after the first.
The conv net is a yardstick only: the demo does not train it. Variants are timed interleaved,
median of ``repeats`` after a warm-up, and read as ratios to ``resmlp``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn

from .experiment.models import build_model, timestep_embedding

SHAPES = ((3, 16, 16), (3, 32, 32))  # the demo's patches16 and patches32
FAMILIES = ("mlp", "resmlp", "conv")


class ConvYardstick(nn.Module):
    """``f(x, t)`` of four 3x3 convolutions with ``channels`` channels at full resolution (SiLU)."""

    def __init__(self, shape: tuple[int, int, int], channels: int = 32, emb_dim: int = 32):
        super().__init__()
        self.shape, self.emb_dim = shape, emb_dim
        c = shape[0]
        self.time = nn.Linear(emb_dim, channels)
        self.convs = nn.ModuleList([nn.Conv2d(c, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1),
                                    nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, c, 3, padding=1)])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.convs[0](x.view(-1, *self.shape)) + self.time(timestep_embedding(t, self.emb_dim))[:, :, None, None]
        for conv in self.convs[1:]:
            h = conv(torch.nn.functional.silu(h))
        return h.flatten(1)


def build(family: str, shape: tuple[int, int, int], *, hidden: int = 256, depth: int = 3) -> nn.Module:
    if family == "conv":
        return ConvYardstick(shape)
    dim = shape[0] * shape[1] * shape[2]
    return build_model(family, dim, hidden=hidden, depth=depth, generator=torch.Generator().manual_seed(0))


def step_seconds(models: dict, dim: int, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one Adam step per model on ``batch`` samples of ``dim`` elements, the models
    timed alternately after one warm-up round."""
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, dim, generator=gen), torch.rand(batch, generator=gen)
    optims = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats + 1):
        for name, m in models.items():
            start = time.perf_counter()
            loss = m(x, t).square().mean()
            optims[name].zero_grad(set_to_none=True)
            loss.backward()
            optims[name].step()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def run(shapes=SHAPES, *, batch: int = 128, repeats: int = 7, families=FAMILIES) -> list[dict]:
    rows = []
    for shape in shapes:
        dim = shape[0] * shape[1] * shape[2]
        secs = step_seconds({f: build(f, shape) for f in families}, dim, batch, repeats)
        base = secs.get("resmlp")
        for f in families:
            rows.append({"shape": list(shape), "D": dim, "model": f, "batch": batch,
                         "ms_per_step": secs[f] * 1e3, "vs_resmlp": secs[f] / base if base else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m immiscible_lab.model_cost", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="timed steps per model and shape (default 7)")
    p.add_argument("--json", help="also write the rows and the environment to this JSON file")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        rows = run(repeats=args.repeats)
    finally:
        torch.set_num_threads(threads)
    env = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "processor": platform.machine(),
           "torch": torch.__version__, "threads": 1}
    print(f"one Adam step, batch 128, 1 thread; {env['platform']}, torch {env['torch']}\n")
    print("| shape | D | model | ms / step | × resmlp |\n|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {'x'.join(map(str, r['shape']))} | {r['D']} | {r['model']} | {r['ms_per_step']:.1f} "
              f"| {r['vs_resmlp']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "repeats": args.repeats, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
