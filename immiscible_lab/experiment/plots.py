"""Matplotlib (Agg) figures of the demo report. Each function writes one PNG and returns its path."""
from __future__ import annotations

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
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_quality(summary_ds: dict, dataset: str, metric_label: str, out_dir: str) -> str:
    """Rows: objectives; columns: sampler step counts; sample distance vs training step, mean ± std."""
    plt = _plt()
    objs = list(summary_ds)
    samplers = list(next(iter(summary_ds[objs[0]].values()))["quality"])
    fig, axes = plt.subplots(len(objs), len(samplers), figsize=(3.3 * len(samplers), 2.9 * len(objs)), squeeze=False)
    for i, obj in enumerate(objs):
        colors = arm_colors(summary_ds[obj])
        for j, s in enumerate(samplers):
            ax = axes[i][j]
            for arm, e in summary_ds[obj].items():
                _band(ax, e["eval_at"], e["quality"][s], colors[arm], arm)
            ax.set_yscale("log")
            ax.set_title(f"{obj}, {s}-step sampler", fontsize=9)
            ax.set_xlabel("training step", fontsize=8)
            ax.set_ylabel(metric_label, fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{dataset}: sample distance to held-out data (lower is better; mean ± std over seeds)", fontsize=10)
    return _save(fig, os.path.join(out_dir, f"quality_{dataset}.png"))


def plot_final(summary_ds: dict, dataset: str, out_dir: str) -> str:
    """Final distance of each arm divided by vanilla's, per sampler step count (bars: mean ± std)."""
    plt = _plt()
    objs = list(summary_ds)
    fig, axes = plt.subplots(1, len(objs), figsize=(5.5 * len(objs), 3.4), squeeze=False)
    for i, obj in enumerate(objs):
        ax, arms = axes[0][i], summary_ds[obj]
        samplers = list(arms["vanilla"]["quality"])
        colors = arm_colors(arms)
        width = 0.8 / len(arms)
        for a_i, (arm, e) in enumerate(arms.items()):
            ratios = [np.asarray(e["quality"][s]["final"]) / np.mean(arms["vanilla"]["quality"][s]["final"])
                      for s in samplers]
            x = np.arange(len(samplers)) + (a_i - (len(arms) - 1) / 2) * width
            ax.bar(x, [r.mean() for r in ratios], width, yerr=[r.std(ddof=1) if r.size > 1 else 0 for r in ratios],
                   color=colors[arm], label=arm, capsize=2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(samplers)), [f"{s} steps" for s in samplers], fontsize=8)
        ax.set_ylabel("final distance / vanilla's", fontsize=8)
        ax.set_title(f"{dataset}, {obj}", fontsize=9)
    axes[0][-1].legend(fontsize=7)
    return _save(fig, os.path.join(out_dir, f"final_{dataset}.png"))


def plot_training(summary_ds: dict, dataset: str, out_dir: str) -> str:
    """Per objective: training loss (the arm's own pairing), held-out loss (independent noise), straightness."""
    plt = _plt()
    objs = list(summary_ds)
    fig, axes = plt.subplots(len(objs), 3, figsize=(11, 2.9 * len(objs)), squeeze=False)
    for i, obj in enumerate(objs):
        colors = arm_colors(summary_ds[obj])
        for arm, e in summary_ds[obj].items():
            _band(axes[i][0], e["loss_at"], e["train_loss"], colors[arm], arm)
            _band(axes[i][1], e["eval_at"], e["val_loss"], colors[arm], arm)
            _band(axes[i][2], e["eval_at"], e["straightness"], colors[arm], arm)
        titles = ("training loss (own pairing)", "held-out loss (independent noise)",
                  "straightness gap |x_1step - x_manystep|^2/D")
        for ax, title in zip(axes[i], titles):
            ax.set_yscale("log")
            ax.set_title(f"{obj}: {title}", fontsize=8)
            ax.set_xlabel("training step", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    return _save(fig, os.path.join(out_dir, f"training_{dataset}.png"))


def plot_noise_and_cost(summary: dict, library_ms: dict, out_dir: str) -> str:
    """Left: |n|^2/D of the noise trained on (N(0, I) gives 1). Right: pairing ms per step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    datasets = list(summary)
    arms = list(next(iter(summary[datasets[0]].values())))
    width = 0.8 / max(1, len(datasets))
    for d_i, ds in enumerate(datasets):
        x = np.arange(len(arms)) + (d_i - (len(datasets) - 1) / 2) * width
        norms = [np.concatenate([summary[ds][o][a]["noise_sq_norm"] for o in summary[ds]]) for a in arms]
        axes[0].bar(x, [n.mean() for n in norms], width, yerr=[n.std() for n in norms], label=ds, capsize=2)
        demo = [np.mean([np.mean(summary[ds][o][a]["pairing_ms"]) for o in summary[ds]]) for a in arms]
        axes[1].bar(x, np.maximum(demo, 1e-3), width, label=f"{ds}: demo's batched pairing")
        if library_ms:
            lib = [library_ms.get(f"{ds}/{a}", np.nan) for a in arms]
            axes[1].scatter(x, np.maximum(lib, 1e-3), marker="x", color="black", zorder=3,
                            label="immiscible.select_noise (torch)" if d_i == 0 else None)
    axes[0].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[0].set_ylabel("|n|^2 / D", fontsize=8)
    axes[0].set_title("norm of the noise trained on (sampling starts from N(0, I): 1)", fontsize=9)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms per training step", fontsize=8)
    axes[1].set_title("pairing wall-clock per step (batch of the demo)", fontsize=9)
    for ax in axes:
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    return _save(fig, os.path.join(out_dir, "noise_and_cost.png"))


def plot_effect(rows: list[dict], out_dir: str) -> str:
    """Distance reduction and chosen-noise std against D, one line per (mode, metric, k)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    keys = sorted({(r["mode"], r["metric"], r["k"]) for r in rows})
    for mode, metric, k in keys:
        sel = sorted((r for r in rows if (r["mode"], r["metric"], r["k"]) == (mode, metric, k)), key=lambda r: r["D"])
        d = [r["D"] for r in sel]
        label = f"{mode} {metric} k={k}" + (f" (B={sel[0]['batch']})" if mode == "assign" else "")
        axes[0].plot(d, [max(r["l2_reduction"], 1e-6) for r in sel], marker="o", label=label)
        axes[1].plot(d, [r["noise_std"] for r in sel], marker="o", label=label)
    axes[0].set_xscale("log"); axes[0].set_yscale("log")
    axes[0].set_title("mean L2 distance reduction vs random noise", fontsize=9)
    axes[1].set_xscale("log"); axes[1].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[1].set_title("std of the chosen noise (N(0, I): 1)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("D (elements per sample)", fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, os.path.join(out_dir, "effect_size.png"))


def plot_samples(samples: dict, dataset: str, reference, out_dir: str) -> str:
    """Samples of the first seed's model, many-step sampler: ``samples[objective][arm]`` (N, D)."""
    plt = _plt()
    objs = list(samples)
    arms = list(samples[objs[0]])
    fig, axes = plt.subplots(len(objs), len(arms) + 1, figsize=(2.2 * (len(arms) + 1), 2.3 * len(objs)), squeeze=False)
    for i, obj in enumerate(objs):
        panels = [("held-out data", reference)] + [(a, samples[obj][a]) for a in arms]
        for j, (title, x) in enumerate(panels):
            ax = axes[i][j]
            x = np.asarray(x)
            if x.shape[1] == 2:
                ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
                ax.set_xlim(-3.5, 3.5); ax.set_ylim(-3.5, 3.5)
            else:
                side = round(x.shape[1] ** 0.5)
                tiles = np.pad(x[:16].reshape(16, side, side), ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
                grid = tiles.reshape(4, 4, side + 2, side + 2).transpose(0, 2, 1, 3).reshape(4 * (side + 2), -1)
                ax.imshow(np.clip(grid, -1, 1), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([]); ax.set_yticks([])
            ax.set_title(title if i == 0 else "", fontsize=8)
        axes[i][0].set_ylabel(obj, fontsize=9)
    return _save(fig, os.path.join(out_dir, f"samples_{dataset}.png"))
