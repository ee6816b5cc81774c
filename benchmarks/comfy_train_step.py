"""What Train LoRA (Immiscible) adds to one ComfyUI training micro-step, at SD1.5, SDXL and Flux latent sizes.

Measured here: what the node does per micro-step (``comfy_nodes.training.TrainingRun.select``:
ComfyUI's stock draw, then ``immiscible.select_noise`` with ``k`` candidates; at ``k = 1`` the stock
draw alone) against the stock draw alone (what ``Noise_RandomNoise`` / ``comfy.sample.prepare_noise``
does every micro-step), batch 1, bfloat16 latents (Train LoRA's default ``training_dtype``), torch
backend, on this machine's CPU, ``k`` = 1, 4, 8, 64, all variants in one run, timed round-robin,
best of ``--repeats`` after one warm-up round (medians are kept in the JSON too). Benchmarks import the core only, so the selection seed here is the repeat's index
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


def draw_once(latents, k, seed: int) -> float:
    """Seconds of one micro-step's noise: the stock draw (``k`` None or 1) or the node's (draw, then select)."""
    t0 = time.perf_counter()
    StockNoise(1000 * seed).generate_noise({"samples": latents})
    if k is not None and k > 1:
        immiscible.select_noise(latents, k, seed=seed, backend="torch", return_info=True)
    return time.perf_counter() - t0


def time_variants(latents, ks, repeats: int) -> dict:
    """``{k: (median s, min s)}`` for every variant (``None``: the stock draw), timed round-robin so that
    a busy machine slows every variant alike; one warm-up round first."""
    times = {k: [] for k in ks}
    for r in range(repeats + 1):
        for k in ks:
            t = draw_once(latents, k, r)
            if r:
                times[k].append(t)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def parse_step(text: str) -> tuple[str, float, str]:
    name, seconds, source = text.split("=", 2)
    return name, float(seconds), source


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None, help="write the rows and the environment here")
    p.add_argument("--step", action="append", type=parse_step, default=None, metavar="NAME=SECONDS=SOURCE",
                   help="a reference stock step time (repeatable; default: DEFAULT_STEPS)")
    args = p.parse_args(argv)
    steps = args.step or list(DEFAULT_STEPS)
    torch.manual_seed(0)
    rows = []
    for name, shape in LATENTS:
        latents = (torch.randn((1, *shape), generator=torch.Generator().manual_seed(7)) * 2).to(torch.bfloat16)
        timed = time_variants(latents, (None, *KS), args.repeats)
        (stock, stock_min) = timed[None]
        for k in KS:
            node, node_min = timed[k]
            extra = max(node_min - stock_min, 0.0)  # the best of N: the least disturbed by other load
            rows.append({"latent": name, "shape": [1, *shape], "D": latents[0].numel(), "k": k,
                         "stock_draw_ms": stock_min * 1e3, "node_ms": node_min * 1e3, "extra_ms": extra * 1e3,
                         "stock_draw_median_ms": stock * 1e3, "node_median_ms": node * 1e3,
                         "x_stock_draw": node_min / stock_min,
                         "share_of_step": {s: extra / sec for s, sec, _ in steps}})
    env = {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(), "processor": platform.processor(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "immiscible": immiscible.__version__,
           "backend": "torch (CPU)", "dtype": "bfloat16", "batch": 1, "repeats": args.repeats,
           "statistic": "best of repeats (round-robin); medians beside"}
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
