"""Matplotlib (Agg) figures of the demo report. Each function writes one PNG and returns its path."""
from __future__ import annotations

import math
import os

import numpy as np


def _plt():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo's plots need matplotlib: pip install 'immiscible-diffusion[demo]' "
                          "(or: pip install matplotlib)") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def arm_colors(arms) -> dict:
    palette = ["black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan"]
    ordered = ["vanilla"] + [a for a in arms if a != "vanilla"]
    return {a: palette[i % len(palette)] for i, a in enumerate(ordered)}


def _band(ax, x, curve, color, label, log=True):
    m, s = np.asarray(curve["mean"]), np.asarray(curve["std"])
    ax.plot(x, m, color=color, label=label, lw=1.6 if label == "vanilla" else 1.2)
    lo = np.maximum(m - s, m * 0.5) if log else m - s
    ax.fill_between(x, lo, m + s, color=color, alpha=0.15, lw=0)


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _panels(summary: dict, dataset: str) -> list[tuple[str, str, dict]]:
    """``(setting key, sampler, setting)`` of every setting of ``dataset`` and each of its samplers."""
    out = []
    for key, st in summary.items():
        if st["dataset"] != dataset:
            continue
        for sampler in st["arms"]["vanilla"]["quality"]:
            out.append((key, sampler, st))
    return out


def _grid(n: int, max_cols: int = 4):
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def _title(key: str, sampler: str) -> str:
    return key.split("/", 1)[1] + ("" if sampler == "euler" else f", {sampler}")


def _panel_figure(count: int, width: float, height: float):
    """A figure with ``count`` panels on a grid (``width`` x ``height`` inches each), spare axes hidden."""
    rows, cols = _grid(count)
    fig, axes = _plt().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes


def plot_quality(summary: dict, dataset: str, metric_label: str, gaussian: float, floor: float, out_dir: str) -> str:
    """Sample distance (most sampler steps) against training step, one panel per setting and sampler."""
    panels = _panels(summary, dataset)
    fig, axes = _panel_figure(len(panels), 3.4, 2.8)
    for ax, (key, sampler, st) in zip(axes.flat, panels):
        colors = arm_colors(st["arms"])
        steps = max(st["arms"]["vanilla"]["quality"][sampler], key=int)
        for arm, e in st["arms"].items():
            _band(ax, e["eval_at"], e["quality"][sampler][steps], colors[arm], arm)
        ax.axhline(gaussian, color="grey", ls="--", lw=0.8, label="moment-matched Gaussian")
        ax.axhline(floor, color="grey", ls=":", lw=0.8, label="floor (data vs data)")
        ax.set_yscale("log")
        ax.set_title(f"{_title(key, sampler)}, {steps} steps", fontsize=8)
        ax.set_xlabel("training step", fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[0].set_ylabel(metric_label, fontsize=7)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(f"{dataset}: sample distance to held-out data (lower is better; mean ± std over seeds)", fontsize=9)
    return _save(fig, os.path.join(out_dir, f"quality_{dataset}.png"))


def plot_final(summary: dict, dataset: str, out_dir: str) -> str:
    """Final distance of each arm divided by vanilla's (paired by seed; geometric mean and per-seed range)."""
    panels = _panels(summary, dataset)
    fig, axes = _panel_figure(len(panels), 3.8, 2.9)
    for ax, (key, sampler, st) in zip(axes.flat, panels):
        arms = st["arms"]
        samplers = list(arms["vanilla"]["quality"][sampler])
        colors = arm_colors(arms)
        width = 0.8 / len(arms)
        van = arms["vanilla"]
        for a_i, (arm, e) in enumerate(arms.items()):
            ratios = [np.log(np.asarray(e["quality"][sampler][s]["final"]) / np.asarray(van["quality"][sampler][s]["final"]))
                      for s in samplers]
            x = np.arange(len(samplers)) + (a_i - (len(arms) - 1) / 2) * width
            mean = np.exp([r.mean() for r in ratios])
            lo = mean - np.exp([r.min() for r in ratios])
            hi = np.exp([r.max() for r in ratios]) - mean
            ax.bar(x, mean, width, yerr=[lo, hi], color=colors[arm], label=arm, capsize=1.5)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(samplers)), [f"{s} steps" for s in samplers], fontsize=7)
        ax.set_title(_title(key, sampler), fontsize=8)
        ax.tick_params(labelsize=6)
    axes.flat[0].set_ylabel("final distance / vanilla's (same seed)", fontsize=7)
    axes.flat[min(len(panels), axes.shape[1]) - 1].legend(fontsize=6)
    fig.suptitle(f"{dataset}: arm / vanilla at the last checkpoint (bars: geometric mean; whiskers: seed range)",
                 fontsize=9)
    return _save(fig, os.path.join(out_dir, f"final_{dataset}.png"))


def plot_robustness(robust: list[dict], cells: list[dict], out_dir: str) -> str:
    """The robustness matrix: one block per (family, objective); rows arm x metric, columns the cells.

    Colour: mean paired log ratio (blue better, red worse, clipped at 2x); ``*``: the cell alone is
    significant (paired t, p < 0.05); ``x``: left out, vanilla does not beat the moment-matched
    Gaussian there. The row's class is written on the right.
    """
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    blocks: dict = {}
    family = {}
    for r in robust:
        blocks.setdefault((r["family"], r["objective"]), []).append(r)
    for c in cells:
        family.setdefault(c["dataset"], None)

    def col_of(c):
        parts = [c["dataset"], c["schedule"] if c["objective"] == "ddpm" else "", c["model"], str(c["budget"]),
                 "" if c["sampler"] == "euler" else c["sampler"].replace("ddim-clip", "clip").replace("ddim", "noclip")]
        return "/".join(p for p in parts if p)

    def col_key(c):
        return (c["dataset"], c["schedule"], c["model"], int(c["budget"]), c["sampler"])

    layout = []
    for (fam, obj), rows in blocks.items():
        members = [c for c in cells if _fam(c, rows) and c["objective"] == obj]
        cols = list(dict.fromkeys(col_of(c) for c in sorted(members, key=col_key)))
        layout.append((fam, obj, rows, cols, members))
    heights = [max(1, len(rows)) * 0.28 + 1.9 for _, _, rows, _, _ in layout]
    width = max(8.0, 2.5 + 0.32 * max(len(cols) for *_, cols, _ in layout) + 3.5)
    fig, axes = plt.subplots(len(layout), 1, figsize=(width, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    norm = TwoSlopeNorm(vmin=-math.log(2), vcenter=0.0, vmax=math.log(2))
    image = None
    for ax, (fam, obj, rows, cols, members) in zip(axes[:, 0], layout):
        rows = sorted(rows, key=lambda r: (r["metric"] != "straightness", _steps_of(r["metric"]), r["arm"]))
        grid = np.full((len(rows), len(cols)), np.nan)
        for i, r in enumerate(rows):
            for c in members:
                if c["arm"] == r["arm"] and c["metric"] == r["metric"]:
                    j = cols.index(col_of(c))
                    if c.get("vanilla_works") is False:   # left out of the row: the model does not work there
                        ax.text(j, i, "x", ha="center", va="center", fontsize=6, color="0.45")
                        continue
                    grid[i, j] = c["mean_log_ratio"]
                    if c["verdict"] != "n.s.":
                        ax.text(j, i, "*", ha="center", va="center", fontsize=7)
        image = ax.imshow(np.clip(grid, -math.log(2), math.log(2)), cmap="coolwarm", norm=norm, aspect="auto")
        ax.set_yticks(range(len(rows)), [f"{r['arm']} | {r['metric']}" for r in rows], fontsize=6)
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=5)
        for i, r in enumerate(rows):
            ax.text(len(cols) - 0.3, i, "  " + r["label"].split(" (")[0], va="center", fontsize=6,
                    color={"robust-better": "tab:blue", "robust-worse": "tab:red"}.get(r["class"], "black"))
        ax.set_title(f"{fam} / {obj}", fontsize=8, loc="left")
    axes[0, 0].set_title("Robustness: the paired effect in every cell (blue better, red worse; * significant alone; "
                         "x left out: vanilla does not beat the Gaussian)\n"
                         f"{layout[0][0]} / {layout[0][1]}", fontsize=8, loc="left")
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=min(0.6, 6.0 / sum(heights) + 0.1), pad=0.25,
                     label="mean log(arm / vanilla), paired by seed")
    path = os.path.join(out_dir, "robustness_matrix.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _fam(cell, rows) -> bool:
    return any(r["arm"] == cell["arm"] and r["metric"] == cell["metric"] and r["objective"] == cell["objective"]
               and _family_of(cell, r) for r in rows)


def _family_of(cell, row) -> bool:
    from .data import FAMILY

    return FAMILY.get(cell["dataset"], cell["dataset"]) == row["family"]


def _steps_of(metric: str) -> int:
    return int(metric.split("@")[1]) if "@" in metric else -1


def plot_noise_and_cost(summary: dict, library_ms: dict, out_dir: str) -> str:
    """Left: |n|^2/D of the noise trained on (N(0, I) gives 1). Right: pairing ms per step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    datasets = list(dict.fromkeys(st["dataset"] for st in summary.values()))
    arms = list(dict.fromkeys(a for st in summary.values() for a in st["arms"]))
    width = 0.8 / max(1, len(datasets))
    for d_i, ds in enumerate(datasets):
        x = np.arange(len(arms)) + (d_i - (len(datasets) - 1) / 2) * width
        sts = [st for st in summary.values() if st["dataset"] == ds]
        norms = [np.concatenate([st["arms"][a]["noise_sq_norm"] for st in sts if a in st["arms"]] or [[np.nan]])
                 for a in arms]
        axes[0].bar(x, [np.nanmean(n) for n in norms], width, label=ds)
        demo = [np.nanmean(np.concatenate([st["arms"][a]["pairing_ms"] for st in sts if a in st["arms"]] or [[np.nan]]))
                for a in arms]
        axes[1].bar(x, np.maximum(demo, 1e-3), width, label=f"{ds}: pairing in training")
        if library_ms:
            lib = [library_ms.get(f"{ds}/{a}", np.nan) for a in arms]
            axes[1].scatter(x, np.maximum(lib, 1e-3), marker="x", color="black", zorder=3,
                            label="immiscible.select_noise (torch)" if d_i == 0 else None)
    axes[0].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[0].set_ylabel("|n|^2 / D", fontsize=8)
    axes[0].set_title("norm of the noise trained on (sampling starts from N(0, I): 1)", fontsize=9)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms per training step", fontsize=8)
    axes[1].set_title("pairing wall-clock per step", fontsize=9)
    for ax in axes:
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    return _save(fig, os.path.join(out_dir, "noise_and_cost.png"))


def plot_effect(rows: list[dict], out_dir: str) -> str:
    """Distance reduction, chosen-noise std and pooled-space cosine against D, one line per (mode, metric, coarse, k)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    keys = sorted({(r["mode"], r["metric"], r.get("coarse", 0), r["k"]) for r in rows})
    for mode, metric, coarse, k in keys:
        sel = sorted((r for r in rows if (r["mode"], r["metric"], r.get("coarse", 0), r["k"]) == (mode, metric, coarse, k)),
                     key=lambda r: r["D"])
        d = [r["D"] for r in sel]
        label = f"{mode} {metric}{f' coarse{coarse}' if coarse else ''} k={k}" + \
            (f" (B={sel[0]['batch']})" if mode == "assign" else "")
        ls = "--" if coarse else "-"
        axes[0].plot(d, [max(r["l2_reduction"], 1e-5) for r in sel], marker="o", ls=ls, label=label)
        axes[1].plot(d, [r["noise_std"] for r in sel], marker="o", ls=ls, label=label)
        pooled = [(r["D"], r.get("pooled_cosine", float("nan"))) for r in sel]
        pooled = [(x, y) for x, y in pooled if math.isfinite(y)]
        if pooled:
            axes[2].plot(*zip(*pooled), marker="o", ls=ls, label=label)
    axes[0].set_xscale("log"); axes[0].set_yscale("log")
    axes[0].set_title("mean L2 distance reduction vs random noise (full space)", fontsize=9)
    axes[1].set_xscale("log"); axes[1].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[1].set_title("std of the chosen noise (N(0, I): 1)", fontsize=9)
    axes[2].set_xscale("log")
    axes[2].set_title("cosine after pooling to N x N (N = coarse, else 8)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("D (elements per sample)", fontsize=8)
    axes[2].legend(fontsize=6)
    return _save(fig, os.path.join(out_dir, "effect_size.png"))


def _tile(x: np.ndarray, shape: tuple) -> np.ndarray:
    """16 samples (16, D) -> one 4 x 4 image grid (H, W) or (H, W, 3) in [0, 1]."""
    x = np.clip((np.asarray(x, dtype=float)[:16] + 1) / 2, 0, 1)
    c, h, w = shape
    imgs = x.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
    n = imgs.shape[0]
    imgs = np.concatenate([imgs, np.ones((16 - n, h, w, c))]) if n < 16 else imgs
    imgs = np.pad(imgs, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
    grid = imgs.reshape(4, 4, h + 2, w + 2, c).transpose(0, 2, 1, 3, 4).reshape(4 * (h + 2), 4 * (w + 2), c)
    return grid[..., 0] if c == 1 else grid


def plot_samples(samples: dict, dataset: str, shape: tuple, reference, out_dir: str) -> str:
    """Samples of the first seed's models (most sampler steps): ``samples[setting key][arm]`` (16, D)."""
    plt = _plt()
    keys = [k for k in samples if k.split("/")[0] == dataset]
    arms = list(dict.fromkeys(a for k in keys for a in samples[k]))
    fig, axes = plt.subplots(len(keys), len(arms) + 1, figsize=(1.9 * (len(arms) + 1), 2.0 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        panels = [("held-out data", reference)] + [(a, samples[key].get(a)) for a in arms]
        for j, (title, x) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([]); ax.set_yticks([])
            ax.set_title(title if i == 0 else "", fontsize=7)
            if x is None:
                ax.axis("off")
                continue
            x = np.asarray(x, dtype=float)
            if len(shape) == 1:
                ax.scatter(x[:, 0], x[:, 1], s=4)
                ax.set_xlim(-3.5, 3.5); ax.set_ylim(-3.5, 3.5)
            else:
                ax.imshow(_tile(x, shape), cmap="gray_r" if shape[0] == 1 else None, vmin=0, vmax=1)
        axes[i][0].set_ylabel(key.split("/", 1)[1], fontsize=6)
    return _save(fig, os.path.join(out_dir, f"samples_{dataset}.png"))
