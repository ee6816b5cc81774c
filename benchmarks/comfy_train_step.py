"""What Train LoRA (Immiscible) adds to one ComfyUI training micro-step, at SD1.5, SDXL and Flux latent sizes.

Measured here: what the node does per micro-step (``comfy_nodes.training.TrainingRun.select``:
ComfyUI's stock draw, then ``immiscible.select_noise`` with ``k`` candidates; at ``k = 1`` the stock
draw alone) against the stock draw alone (what ``Noise_RandomNoise`` / ``comfy.sample.prepare_noise``
does every micro-step), batch 1, bfloat16 latents (Train LoRA's default ``training_dtype``), torch
backend, on this machine's CPU, ``k`` = 1, 4, 8, 64, all variants in one run, median of ``--repeats``
after one warm-up. Benchmarks import the core only, so the selection seed here is the repeat's index
(the node derives it from the stock draw, which costs microseconds and does not change the work).

Not measured here: a stock SDXL or Flux training step (no such model runs on this CPU). The table
sets the selection against reference step times given with ``--step NAME=SECONDS=SOURCE`` (see
``DEFAULT_STEPS``: each says whether it was measured or taken from elsewhere, and where).

Usage: ``python benchmarks/comfy_train_step.py [--repeats 5] [--json benchmarks/comfy_train_step.json]``
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import immiscible

#: (name, latent shape of one sample) at the resolution each model family trains at.
LATENTS = (("SD1.5 512 px", (4, 64, 64)), ("SDXL 1024 px", (4, 128, 128)), ("Flux 1024 px", (16, 128, 128)))
KS = (1, 4, 8, 64)
#: Reference stock step times: (name, seconds per micro-step, where the figure comes from).
DEFAULT_STEPS = (
    ("SD1.5 64 px, this CPU", 8.5,
     "measured: ComfyUI a125cd84 stock Train LoRA, random SD1.5, fp32, batch 1, 2 CPU cores, tqdm 8.1-9.7 s/it "
     "in tests/integration/test_comfyui_train.py (2026-12-06)"),
    ("Flux QLoRA 512x768, RTX 4090", 41 * 60 / 700,
     "taken from elsewhere: 700 steps in about 41 min on an RTX 4090 (Hugging Face's Flux QLoRA write-up, as "
     "quoted in huggingface.co/datasets/John6666/forum2 lora_train_cost_1.md); not measured here"),
)


class StockNoise:
    """``comfy_extras.nodes_custom_sampler.Noise_RandomNoise`` as ``comfy.sample.prepare_noise`` draws it."""

    def __init__(self, seed):
        self.seed = seed

    def generate_noise(self, input_latent):
        latent = input_latent["samples"]
        return torch.randn(latent.size(), dtype=latent.dtype, layout=latent.layout,
                           generator=torch.manual_seed(self.seed), device="cpu")


def time_draw(latents, k: int, repeats: int) -> float:
    """Median seconds of one micro-step's noise: the stock draw (``k`` None) or the node's (draw, then select)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        StockNoise(1000 * i).generate_noise({"samples": latents})
        if k is not None and k > 1:
            immiscible.select_noise(latents, k, seed=i, backend="torch", return_info=True)
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_step(text: str) -> tuple[str, float, str]:
    name, seconds, source = text.split("=", 2)
    return name, float(seconds), source


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    p.add_argument("--step", action="append", type=parse_step, default=None, metavar="NAME=SECONDS=SOURCE",
                   help="a reference stock step time (repeatable; default: DEFAULT_STEPS)")
    args = p.parse_args(argv)
    steps = args.step or list(DEFAULT_STEPS)
    torch.manual_seed(0)
    rows = []
    for name, shape in LATENTS:
        latents = (torch.randn((1, *shape), generator=torch.Generator().manual_seed(7)) * 2).to(torch.bfloat16)
        stock = time_draw(latents, None, args.repeats)
        for k in KS:
            node = time_draw(latents, k, args.repeats)
            rows.append({"latent": name, "shape": [1, *shape], "D": latents[0].numel(), "k": k,
                         "stock_draw_ms": stock * 1e3, "node_ms": node * 1e3, "extra_ms": (node - stock) * 1e3,
                         "x_stock_draw": node / stock,
                         "share_of_step": {s: (node - stock) / sec for s, sec, _ in steps}})
    env = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "processor": platform.processor(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "immiscible": immiscible.__version__,
           "backend": "torch (CPU)", "dtype": "bfloat16", "batch": 1, "repeats": args.repeats}
    out = {"environment": env, "reference_steps": [{"name": s, "seconds": sec, "source": src} for s, sec, src in steps],
           "rows": rows}
    print(f"{'latent':<14} {'D':>7} {'k':>3} {'stock draw ms':>14} {'node ms':>9} {'extra ms':>9} {'x draw':>7}  "
          + "  ".join(f"extra / {s}" for s, _, _ in steps))
    for r in rows:
        print(f"{r['latent']:<14} {r['D']:>7} {r['k']:>3} {r['stock_draw_ms']:>14.2f} {r['node_ms']:>9.2f} "
              f"{r['extra_ms']:>9.2f} {r['x_stock_draw']:>7.2f}  "
              + "  ".join(f"{r['share_of_step'][s]:>{len('extra / ' + s)}.3%}" for s, _, _ in steps))
    for s, sec, src in steps:
        print(f"reference step '{s}': {sec:.2f} s ({src})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
