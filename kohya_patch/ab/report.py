"""``report.md`` and its figures from :func:`kohya_patch.ab.analysis.analyse`'s results."""
from __future__ import annotations

import os
import re
from pathlib import Path

from immiscible_host import abtest
from immiscible_host.envinstall import write_atomic

from .plan import CONTROL, OUT_HINT, TREATMENT

#: sd-scripts' sample file name: ``{output_name}_{step:06d | e{epoch:06d}}_{prompt:02d}_{time}[_{seed}].png``.
SAMPLE_NAME = re.compile(r"_(e?\d+)_(\d+)_(\d{14})(?:_(-?\d+))?\.png$")
#: At most this many rows (seed x prompt) in the sample sheet.
SHEET_ROWS = 8


def pct(d) -> str:
    return "–" if d is None else f"{abtest.percent(d):+.3f} %"


def fmt(x, spec=".5g") -> str:
    return "–" if x is None else format(x, spec)


def last_samples(sample_dir) -> tuple[str, dict[int, Path]] | None:
    """The newest sample step's images of a run: ``(step label, {prompt index: file})``."""
    groups: dict[str, dict[int, Path]] = {}
    newest: dict[str, str] = {}
    for p in sorted(Path(sample_dir).glob("*.png")) if os.path.isdir(sample_dir) else []:
        m = SAMPLE_NAME.search(p.name)
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = p
            newest[m.group(1)] = max(newest.get(m.group(1), ""), m.group(3))
    if not groups:
        return None
    label = max(groups, key=lambda k: newest[k])
    return label, groups[label]


def sample_pairs(arm_dirs: dict, seeds) -> list[tuple[str, Path, Path]]:
    """``(caption, control image, treatment image)`` at each seed's last sample step both arms reached."""
    pairs = []
    for s in seeds:
        c = last_samples(os.path.join(arm_dirs[(s, CONTROL)], "model", "sample"))
        t = last_samples(os.path.join(arm_dirs[(s, TREATMENT)], "model", "sample"))
        if c is None or t is None or c[0] != t[0]:
            continue
        for i in sorted(set(c[1]) & set(t[1])):
            pairs.append((f"seed {s}, sample {c[0]}, prompt {i}", c[1][i], t[1][i]))
    return pairs[:SHEET_ROWS]


def plot_curves(res, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    for arm, color in ((CONTROL, "tab:blue"), (TREATMENT, "tab:orange")):
        curves = [dict(r["curve"][arm]) for r in res["per_seed"].values() if r["curve"][arm]]
        steps = sorted(set().union(*curves)) if curves else []
        if not steps:
            continue
        vals = np.array([[c.get(s, np.nan) for s in steps] for c in curves])
        mean = np.nanmean(vals, axis=0)
        ax.plot(steps, mean, "o-", color=color, label=f"{arm} (mean of {len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(steps, np.nanmin(vals, axis=0), np.nanmax(vals, axis=0), color=color, alpha=0.2,
                            label=f"{arm} (min–max over seeds)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (stock noise)")
    ax.set_title("Validation loss, both arms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_effects(res, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.8), dpi=100)
    seeds = [s for s, r in res["per_seed"].items() if r.get("d") is not None]
    ys = list(range(len(seeds)))
    ax.plot([abtest.percent(res["per_seed"][s]["d"]) for s in seeds], ys, "o", color="tab:purple", label="per seed")
    iv = res.get("interval")
    if iv:
        y = len(seeds) + 0.5
        ax.errorbar([abtest.percent(iv["mean"])], [y], xerr=[[abtest.percent(iv["mean"]) - abtest.percent(iv["low"])],
                    [abtest.percent(iv["high"]) - abtest.percent(iv["mean"])]], fmt="s", color="black", capsize=4,
                    label="mean, 95 % t-interval")
        ys.append(y)
    ax.axvline(0.0, color="grey", lw=1)
    ax.set_yticks(ys, [f"seed {s}" for s in seeds] + (["all seeds"] if iv else []))
    ax.set_xlabel("treatment vs control, final validation loss (%; below 0 = lower loss)")
    ax.set_title("Per-seed effect d_s" + ("" if iv else " (no interval: fewer than 3 seeds)"))
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(pairs, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(len(pairs), 2, figsize=(4.4, 2.2 * len(pairs)), dpi=80, squeeze=False)
    for row, (caption, c, t) in zip(axes, pairs):
        for ax, img, arm in ((row[0], c, CONTROL), (row[1], t, TREATMENT)):
            with Image.open(img) as im:
                ax.imshow(im.convert("RGB"), interpolation="nearest")
            ax.set_title(f"{arm}\n{caption}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(res, meta) -> str:
    """The report's text (figures are linked by file name)."""
    lines = [f"# A/B: {meta['treatment']} against stock noise", ""]
    if meta.get("note"):
        lines += [f"> {meta['note']}", ""]
    lines += [f"- command: `{meta['command']}`", f"- trainer: {meta['trainer']}, sd-scripts {meta['version']}",
              f"- seeds: {', '.join(map(str, res['seeds']))} (the unit of the statistics; only `--seed` differs "
              f"between seeds), {meta['steps']} steps per run",
              f"- validation: seed {meta['validation_seed']} in every run; {meta['validation_note']}",
              *(["- a 1-step warm-up run filled the disk caches before the arms (the run that writes them draws "
                 "random numbers while encoding; the arms all load them)"] if meta.get("warmup") else []),
              f"- effect per seed: d_s = log(mean L_treatment / mean L_control) over every validation item and "
              f"timestep of the last {meta['last']} validation pass(es)", "", "## Verdict", "", res["verdict"], ""]
    if not res["self_test"] and res["validated"]:
        lines += [abtest.NOT_MEASURED, ""]
    lines += ["## Per seed", "", "| seed | control loss | treatment loss | d_s | change | same timesteps | "
              "same images | reduction | wall control s | wall treatment s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s, r in res["per_seed"].items():
        loss = r.get("loss") or {}
        crn = r["crn"]
        lines.append(f"| {s} | {fmt(loss.get(CONTROL), '.6g')} | {fmt(loss.get(TREATMENT), '.6g')} | "
                     f"{fmt(r.get('d'), '+.5f')} | {pct(r.get('d'))} | {crn['same_timesteps']} | {crn['same_images']} | "
                     f"{fmt(r['reduction'], '.4f')} | {fmt(r['wall_s'][CONTROL], '.0f')} | "
                     f"{fmt(r['wall_s'][TREATMENT], '.0f')} |")
    iv = res.get("interval")
    lines += ["", "## Over seeds", ""]
    if iv:
        lines += [f"- mean d = {iv['mean']:+.5f} ({pct(iv['mean'])}), 95 % t-interval ({iv['n'] - 1} df) "
                  f"{pct(iv['low'])} to {pct(iv['high'])}, sd over seeds {iv['sd']:.5f}",
                  f"- smallest effect this run could detect (two-sided 5 %, 80 % power): ±{pct(res['mde'])[1:]}"]
    else:
        lines += [f"- {len(res['effects'])} seed(s) with a validation loss: no interval (needs at least "
                  f"{abtest.MIN_SEEDS_FOR_INTERVAL}; 5 recommended) and no detectable-effect figure"]
    ov = res.get("overhead")
    lines += [f"- selection's time per step: {'–' if ov is None else f'{ov[0] * 1000:+.1f} ms ({ov[1] * 100:+.1f} %)'} "
              "(median step durations, treatment minus control)",
              f"- mean `immiscible/reduction` of the treatment: {fmt(res.get('reduction'), '.4f')}",
              f"- wall time: {meta['wall_arms']:.0f} s in {meta['runs']} trainings"
              + (f" and {meta['warmup']:.0f} s in the cache warm-up" if meta.get("warmup") else "")
              + f", {meta['wall_total']:.0f} s for the whole A/B (this invocation)", ""]
    any_t = next((r["per_timestep"] for r in res["per_seed"].values() if r.get("per_timestep")), None)
    if any_t:
        lines += ["## Per timestep (descriptive only: no test, no interval)", "",
                  "| timestep | control loss | treatment loss | change |", "|---|---|---|---|"]
        ts = sorted({t for r in res["per_seed"].values() for t in (r.get("per_timestep") or {})})
        for t in ts:
            vals = [r["per_timestep"][t] for r in res["per_seed"].values() if t in (r.get("per_timestep") or {})]
            c = sum(v[0] for v in vals) / len(vals)
            x = sum(v[1] for v in vals) / len(vals)
            lines.append(f"| {t:g} | {c:.6g} | {x:.6g} | {pct(abtest.log_ratio_of_means([x], [c]))} |")
        lines.append("")
    lines += ["## Figures", ""]
    for name, caption in meta["figures"]:
        lines += [f"![{caption}]({name})", ""]
    if not res["self_test"]:
        lines += ["## How to read this", "", abtest.BIAS, "",
                  "The validation loss is recorded in-process for every item and timestep sd-scripts validates "
                  "(its TensorBoard `loss/validation/step_average` is a running mean over passes and is not this "
                  "figure); it is the per-item loss before per-image weights, masks and min-SNR-style weighting.",
                  ""]
    return "\n".join(lines)


def write_report(res, meta, out: Path, arm_dirs: dict) -> Path:
    """``out/report.md`` with ``val_loss.png``, ``effects.png`` and, when there are samples, ``samples.png``."""
    figures = []
    try:
        import matplotlib  # noqa: F401 - sd-scripts does not require it
    except ImportError:
        meta = dict(meta, note=((meta.get("note") or "") + " No figures: matplotlib is not installed in this Python "
                                "(pip install matplotlib, then run the same command again: the finished runs are "
                                "kept and only the report is redrawn).").strip())
        draw, pairs = False, []
    else:
        draw, pairs = True, sample_pairs(arm_dirs, res["seeds"])
    if draw and res["validated"]:
        plot_curves(res, out / "val_loss.png")
        plot_effects(res, out / "effects.png")
        figures += [("val_loss.png", "validation loss against step, both arms"),
                    ("effects.png", "per-seed effect and interval")]
    if pairs:
        plot_samples(pairs, out / "samples.png")
        figures.append(("samples.png", "the same prompts and seeds, control (left) and treatment (right)"))
    text = markdown(res, dict(meta, figures=figures))
    write_atomic(out / "report.md", text, hint=OUT_HINT)
    return out / "report.md"
