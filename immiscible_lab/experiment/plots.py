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


def _grid(n: int, max_cols: int = 3):
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
    fig, axes = _panel_figure(len(panels), 3.6, 3.0)
    for ax, (key, sampler, st) in zip(axes.flat, panels):
        colors = arm_colors(st["arms"])
        steps = max(st["arms"]["vanilla"]["quality"][sampler], key=int)
        for arm, e in st["arms"].items():
            _band(ax, e["eval_at"], e["quality"][sampler][steps], colors[arm], arm)
        ax.axhline(gaussian, color="grey", ls="--", lw=0.8, label="moment-matched Gaussian")
        ax.axhline(floor, color="grey", ls=":", lw=0.8, label="floor (data vs data)")
        ax.set_yscale("log")
        ax.set_title(f"{_title(key, sampler)}, {steps} steps", fontsize=10)
        ax.set_xlabel("training step", fontsize=9)
        ax.tick_params(labelsize=9)
    axes.flat[0].set_ylabel(metric_label, fontsize=9)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{dataset}: sample distance to held-out data (lower is better; mean ± std over seeds)", fontsize=11)
    return _save(fig, os.path.join(out_dir, f"quality_{dataset}.png"))


def plot_final(summary: dict, dataset: str, out_dir: str) -> str:
    """Final distance of each arm divided by vanilla's (paired by seed; geometric mean and per-seed range)."""
    panels = _panels(summary, dataset)
    fig, axes = _panel_figure(len(panels), 3.6, 3.0)
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
        ax.set_xticks(range(len(samplers)), [f"{s} steps" for s in samplers], fontsize=9)
        ax.set_title(_title(key, sampler), fontsize=10)
        ax.tick_params(labelsize=9)
    axes.flat[0].set_ylabel("final distance / vanilla's (same seed)", fontsize=9)
    axes.flat[min(len(panels), axes.shape[1]) - 1].legend(fontsize=8)
    fig.suptitle(f"{dataset}: arm / vanilla at the last checkpoint (bars: geometric mean; whiskers: seed range)",
                 fontsize=11)
    return _save(fig, os.path.join(out_dir, f"final_{dataset}.png"))


_OBJECTIVE_LABEL = {"flow": "flow (Euler)", "ddpm": "ε-DDPM (DDIM)"}
_SCHEDULE_SHORT = {"scaled-linear": "sc-lin", "cosine": "cosine"}
_CLASS_COLOR = {"robust-better": "tab:blue", "robust-worse": "tab:red", "depends": "tab:orange"}
#: the x range of the summary figure, as arm / vanilla ratios (clipped beyond)
_SUMMARY_RANGE = (0.04, 3.3)


def _metric_short(metric: str) -> str:
    if not metric.startswith("quality@"):
        return metric
    steps = metric.split("@")[1]
    return f"{steps} step{'' if steps == '1' else 's'}"


def _class_short(row: dict) -> str:
    if row["class"] == "depends":
        return "depends: " + (", ".join(row.get("flips") or []) or "cell")
    return {"robust-better": "robustly better", "robust-worse": "robustly worse", "unclassified": "left out",
            "none": "no robust effect" if row.get("n_better") or row.get("n_worse") else "no effect"}[row["class"]]


def robustness_families(robust: list[dict]) -> list[str]:
    """The data families of ``robust``, in order: one robustness figure each."""
    return list(dict.fromkeys(r["family"] for r in robust))


def plot_robustness(robust: list[dict], cells: list[dict], out_dir: str, family: str) -> str:
    """The robustness matrix of one data family, ``robustness_{family}.png``: one block per objective;
    rows metric x arm, columns the cells (size, schedule, model, budget, clipping).

    Colour: mean paired log ratio (blue better, red worse, clipped at 2x); ``*``: the cell alone is
    significant (paired t, p < 0.05); ``x``: left out, vanilla does not beat the moment-matched
    Gaussian there. The row's class is written on the right. Fonts of 10 pt at 100 dpi: readable
    when the PNG is shown at its own width (about 1000 px for the largest grid).
    """
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    from .data import FAMILY

    mine = [c for c in cells if FAMILY.get(c["dataset"], c["dataset"]) == family]
    multi_size = len({c["dataset"] for c in mine}) > 1
    multi_model = len({c["model"] for c in mine}) > 1

    def col_of(c):
        parts = [c["dataset"] if multi_size else "",
                 _SCHEDULE_SHORT.get(c["schedule"], c["schedule"]) if c["objective"] == "ddpm" else "",
                 c["model"] if multi_model else "", str(c["budget"]),
                 "" if c["sampler"] == "euler" else ("clip" if c["sampler"] == "ddim-clip" else "no clip")]
        return " ".join(p for p in parts if p)

    def col_key(c):
        return (c["dataset"], c["schedule"], c["model"], int(c["budget"]), c["sampler"])

    blocks: dict = {}
    for r in robust:
        if r["family"] == family:
            blocks.setdefault(r["objective"], []).append(r)
    arm_order = list(dict.fromkeys(r["arm"] for r in robust))
    layout = []
    for obj in sorted(blocks, key=lambda o: o != "flow"):
        members = [c for c in mine if c["objective"] == obj]
        cols = list(dict.fromkeys(col_of(c) for c in sorted(members, key=col_key)))
        rows = sorted(blocks[obj], key=lambda r: (r["metric"] == "straightness", _steps_of(r["metric"]),
                                                  arm_order.index(r["arm"])))
        layout.append((obj, rows, cols, members))
    path = os.path.join(out_dir, f"robustness_{family}.png")
    if not layout:
        return _empty_figure(path, f"{family}: no robustness row (no arm besides vanilla).")
    ncols = max(len(cols) for _, _, cols, _ in layout)
    label_in = max(len(c) for _, _, cols, _ in layout for c in cols) * 0.06
    heights = [len(rows) * 0.32 + label_in + 0.5 for _, rows, _, _ in layout]
    fig, axes = plt.subplots(len(layout), 1, figsize=(max(8.0, 4.8 + 0.4 * ncols), sum(heights) + 1.0),
                             squeeze=False, gridspec_kw={"height_ratios": heights}, layout="constrained")
    norm = TwoSlopeNorm(vmin=-math.log(2), vcenter=0.0, vmax=math.log(2))
    image = None
    for ax, (obj, rows, cols, members) in zip(axes[:, 0], layout):
        grid = np.full((len(rows), len(cols)), np.nan)
        index = {(r["arm"], r["metric"]): i for i, r in enumerate(rows)}
        for c in members:
            i = index.get((c["arm"], c["metric"]))
            if i is None:
                continue
            j = cols.index(col_of(c))
            if c.get("vanilla_works") is False:   # left out of the row: the model does not work there
                ax.text(j, i, "x", ha="center", va="center", fontsize=10, color="0.4")
                continue
            grid[i, j] = c["mean_log_ratio"]
            if c["verdict"] != "n.s.":
                ax.text(j, i, "*", ha="center", va="center", fontsize=13)
        image = ax.imshow(np.clip(grid, -math.log(2), math.log(2)), cmap="coolwarm", norm=norm, aspect="auto")
        ax.set_yticks(range(len(rows)), [f"{_metric_short(r['metric'])}: {r['arm']}" for r in rows], fontsize=10)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", rotation_mode="anchor", fontsize=10)
        for i in range(1, len(rows)):
            if rows[i]["metric"] != rows[i - 1]["metric"]:
                ax.axhline(i - 0.5, color="white", lw=3)
        right = ax.secondary_yaxis("right")
        right.set_yticks(range(len(rows)), [_class_short(r) for r in rows], fontsize=10)
        right.tick_params(length=0)
        for label, r in zip(right.get_yticklabels(), rows):
            label.set_color(_CLASS_COLOR.get(r["class"], "0.3"))
            if r["class"].startswith("robust"):
                label.set_fontweight("bold")
        ax.set_title(f"{family}, {_OBJECTIVE_LABEL.get(obj, obj)}\ncolumns: cells "
                     f"({'size, ' if multi_size else ''}{'schedule, ' if obj == 'ddpm' else ''}"
                     f"{'model, ' if multi_model else ''}training steps{', DDIM clipping' if obj == 'ddpm' else ''})",
                     fontsize=11, loc="left")
    fig.suptitle(f"{family}: each arm against vanilla, paired by seed\nblue better, red worse; * significant in "
                 "that cell alone\nx: left out (vanilla does not beat the moment-matched Gaussian there)", fontsize=11)
    if image is not None:
        bar = fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.7, aspect=25,
                           pad=0.02, location="bottom")
        bar.set_ticks([-math.log(2), -math.log(4 / 3), 0.0, math.log(4 / 3), math.log(2)],
                      labels=["−50%", "−25%", "0", "+33%", "+100%"])
        bar.ax.tick_params(labelsize=10)
        bar.set_label("arm / vanilla − 1 (geometric mean over seeds; clipped at ½ and 2)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ratio_ticks(lo: float, hi: float):
    ticks = [t for t in (0.1, 0.25, 0.5, 0.75, 1.0, 2.0) if lo <= t <= hi]
    return ticks, [("0" if t == 1 else f"{100 * (t - 1):+.0f}%").replace("-", "−") for t in ticks]


def plot_summary(rows: list[dict], out_dir: str, name: str = "summary.png", title: str | None = None) -> str:
    """The one-glance figure: for each objective (rows of panels) and sampler step count (columns),
    each arm's median change against vanilla over the cells of its robustness row (marker) and the
    range over those cells (line); one colour per data series, filled where the finding is robust.

    ``rows`` are robustness rows (:func:`stats.robustness`); a row's ``series`` (default: its data
    family) names its colour, so rows of several reports can share one figure. Straightness rows and
    rows with no cell left are not drawn. Sized for about 1100 px at 100 dpi with 10-12 pt text.
    """
    plt = _plt()
    from matplotlib.lines import Line2D

    rows = [r for r in rows if r["metric"].startswith("quality@") and r["class"] != "unclassified"
            and math.isfinite(r.get("rel_median", float("nan")))]
    path = os.path.join(out_dir, name)
    if not rows:
        return _empty_figure(path, "No classified row: no arm besides vanilla, or vanilla beats the moment-matched "
                                   "Gaussian in no cell.")
    objectives = sorted({r["objective"] for r in rows}, key=lambda o: o != "flow")
    steps = sorted({_steps_of(r["metric"]) for r in rows})
    series = list(dict.fromkeys(r.get("series", r["family"]) for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    palette = ["tab:purple", "tab:green", "tab:brown", "tab:cyan", "tab:olive", "tab:pink", "tab:gray"]
    color = {s: palette[i % len(palette)] for i, s in enumerate(series)}
    per_arm = max(1.0, 0.4 * len(series))
    panel_h = 0.7 + per_arm * len(arms) * 0.36
    fig, axes = plt.subplots(len(steps), len(objectives), figsize=(max(8.5, 5.2 * len(objectives) + 1.6),
                                                                   panel_h * len(steps) + 1.4),
                             squeeze=False, sharey=True, layout="constrained")
    lo, hi = _SUMMARY_RANGE
    ticks, labels = _ratio_ticks(lo, hi)
    spread = 0.75 / len(series)
    for i, s in enumerate(steps):
        for j, obj in enumerate(objectives):
            ax = axes[i, j]
            ax.axvspan(lo, 1.0, color="tab:blue", alpha=0.06, lw=0)
            ax.axvspan(1.0, hi, color="tab:red", alpha=0.06, lw=0)
            ax.axvline(1.0, color="0.3", lw=1)
            for r in rows:
                if r["objective"] != obj or _steps_of(r["metric"]) != s:
                    continue
                k = series.index(r.get("series", r["family"]))
                y = arms.index(r["arm"]) + (k - (len(series) - 1) / 2) * spread
                med, a, b = (min(max(1.0 + r[f], lo), hi) for f in ("rel_median", "rel_min", "rel_max"))
                c = color[series[k]]
                ax.plot([a, b], [y, y], color=c, lw=2.2, alpha=0.55, solid_capstyle="butt")
                robust = r["class"].startswith("robust")
                ax.plot([med], [y], marker="D" if r["class"] == "depends" else "o", ms=9 if robust else 7,
                        mfc=c if robust else "white", mec=c, mew=1.8, ls="none")
                if robust:
                    text = f"{100 * r['rel_median']:+.0f}%".replace("-", "−")
                    right = b * 1.12 < hi * 0.75 or med > 1.0
                    ax.text(b * 1.08 if right else a / 1.08, y, text, fontsize=9, color=c, va="center",
                            ha="left" if right else "right", fontweight="bold")
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            ax.set_xticks(ticks, labels, fontsize=10)
            ax.minorticks_off()
            ax.set_ylim(len(arms) - 0.5, -0.5)
            ax.set_yticks(range(len(arms)), arms, fontsize=11)
            for y in range(1, len(arms)):
                ax.axhline(y - 0.5, color="0.85", lw=0.8)
            ax.set_title(f"{_OBJECTIVE_LABEL.get(obj, obj)}, {s} sampler step{'s' if s != 1 else ''}", fontsize=12)
            if i == len(steps) - 1:
                ax.set_xlabel("arm vs vanilla  (← better · worse →)", fontsize=10)
    handles = [Line2D([], [], color=color[s], marker="o", mfc=color[s], lw=2.2, ms=8, label=s) for s in series]
    handles += [Line2D([], [], color="0.3", marker="o", mfc="0.3", ls="none", ms=9, label="robust"),
                Line2D([], [], color="0.3", marker="o", mfc="white", mew=1.8, ls="none", ms=7,
                       label="not robust"),
                Line2D([], [], color="0.3", marker="D", mfc="white", mew=1.8, ls="none", ms=7,
                       label="depends on an axis")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=10, frameon=False)
    fig.suptitle(title or "Change of the sample distance against vanilla\nmarker: median over cells · line: range "
                          "over cells · filled: robust", fontsize=12)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _empty_figure(path: str, text: str) -> str:
    plt = _plt()
    fig = plt.figure(figsize=(8, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _steps_of(metric: str) -> int:
    return int(metric.split("@")[1]) if "@" in metric else -1


def plot_noise_and_cost(summary: dict, library_ms: dict, out_dir: str) -> str:
    """Left: |n|^2/D of the noise trained on (N(0, I) gives 1). Right: pairing ms per step."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
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
    axes[0].set_ylabel("|n|² / D", fontsize=10)
    axes[0].set_title("norm of the noise trained on\n(sampling starts from N(0, I): 1)", fontsize=11)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms per training step", fontsize=10)
    axes[1].set_title("pairing wall-clock per step", fontsize=11)
    for ax in axes:
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", rotation_mode="anchor", fontsize=10)
        ax.tick_params(axis="y", labelsize=10)
        ax.legend(fontsize=9)
    return _save(fig, os.path.join(out_dir, "noise_and_cost.png"))


def plot_effect(rows: list[dict], out_dir: str) -> str:
    """Distance reduction, chosen-noise std and pooled-space cosine against D, one line per (mode, metric, coarse, k)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 7.6))
    legend_ax = axes[1, 1]
    axes = [axes[0, 0], axes[0, 1], axes[1, 0]]
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
    axes[0].set_title("mean L2 distance reduction\nvs random noise (full space)", fontsize=11)
    axes[1].set_xscale("log"); axes[1].axhline(1.0, color="grey", ls="--", lw=0.8)
    axes[1].set_title("std of the chosen noise (N(0, I): 1)", fontsize=11)
    axes[2].set_xscale("log")
    axes[2].set_title("cosine after pooling to N × N\n(N = coarse, else 8)", fontsize=11)
    for ax in axes:
        ax.set_xlabel("D (elements per sample)", fontsize=10)
        ax.tick_params(labelsize=10)
        ax.xaxis.set_minor_formatter(_plt().NullFormatter())
    legend_ax.axis("off")
    legend_ax.legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=10, frameon=False,
                     title="selection (dashed: coarse)", title_fontsize=10)
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
    fig, axes = plt.subplots(len(keys), len(arms) + 1, figsize=(1.8 * (len(arms) + 1), 1.9 * len(keys) + 0.2), squeeze=False)
    for i, key in enumerate(keys):
        panels = [("held-out data", reference)] + [(a, samples[key].get(a)) for a in arms]
        for j, (title, x) in enumerate(panels):
            ax = axes[i][j]
            ax.set_xticks([]); ax.set_yticks([])
            ax.set_title(title if i == 0 else "", fontsize=10)
            if x is None:
                ax.axis("off")
                continue
            x = np.asarray(x, dtype=float)
            if len(shape) == 1:
                ax.scatter(x[:, 0], x[:, 1], s=4)
                ax.set_xlim(-3.5, 3.5); ax.set_ylim(-3.5, 3.5)
            else:
                ax.imshow(_tile(x, shape), cmap="gray_r" if shape[0] == 1 else None, vmin=0, vmax=1)
        axes[i][0].set_ylabel(key.split("/", 1)[1], fontsize=9)
    return _save(fig, os.path.join(out_dir, f"samples_{dataset}.png"))
