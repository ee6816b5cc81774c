"""Command line: ``python -m immiscible_lab demo`` (the A/B experiment) and ``python -m immiscible_lab effect``."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import replace


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}: {text!r}") from exc
    return parse


def _add_demo(sub):
    p = sub.add_parser(
        "demo", help="train small diffusion models under each noise pairing and write an A/B report",
        description="Train small eps-prediction DDPM and rectified-flow models on a 2-D Gaussian mixture, "
                    "scikit-learn's 8x8 digits and 16x16 / 32x32 RGB patches of scikit-learn's sample photos under "
                    "vanilla, knn, assign and coarse noise pairing (equal compute, several seeds, paired by seed), "
                    "then write a report folder (report.md, results.json, runs.jsonl, PNGs) that leads with the "
                    "verdicts that hold across training budget, DDPM schedule, DDIM clipping, model and image size, "
                    "and print them. Defaults: under 10 min on a 2-core CPU.")
    p.add_argument("--quick", action="store_const", const="quick", dest="preset",
                   help="smoke-test size (2 seeds, ~100 steps, small MLPs; under a minute on 2 cores; the numbers mean "
                        "little). Options below override it")
    p.add_argument("--preset", choices=("default", "quick", "tiny", "full"), default="default",
                   help="a named configuration: 'full' covers every axis (digits, 16x16 and 32x32 patches; both DDPM "
                        "schedules, both model families, clipping on/off, 2-3 budgets, patches to 4500 steps; about "
                        "1.5-2 h on 2 cores with --workers 2; use --resume after an interruption); 'tiny' is the "
                        "unit test's")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs recorded in OUT/runs.jsonl and train only the rest")
    g = p.add_argument_group("grid")
    g.add_argument("--datasets", type=_csv(str), help="comma list of gmm,digits,patches16,patches32 (default: gmm,digits)")
    g.add_argument("--objectives", type=_csv(str), help="comma list of ddpm,flow (default: both)")
    g.add_argument("--schedules", type=_csv(str), help="DDPM noise schedules: scaled-linear,cosine (default scaled-linear)")
    g.add_argument("--models", type=_csv(str), help="model families: mlp,resmlp (residual MLP with a learned input "
                                                   "skip) (default mlp)")
    g.add_argument("--arms", type=_csv(str),
                   help="comma list; vanilla, knn-{l2,cosine}-K, assign[-{l2,cosine}[-K]], knn-coarseN-K (L2 after "
                        "NxN average pooling), assign-coarseN[-K]; coarse arms are skipped where N exceeds the image "
                        "(default: vanilla,knn-l2-4,knn-cosine-4,knn-coarse4-4,assign-l2-1)")
    g.add_argument("--seeds", type=int, help="seeds per arm (default 3)")
    g.add_argument("--base-seed", type=int, help="first seed (default 0)")
    t = p.add_argument_group("training (the same for every arm)")
    t.add_argument("--steps", type=int, help="training steps per run, every data set (default: gmm 1000, digits 3000)")
    t.add_argument("--budgets", type=_csv(int),
                   help="training steps at which verdicts are also read, from checkpoints of the same runs "
                        "(default: gmm 250, digits 1000; the last step always counts)")
    t.add_argument("--batch-size", type=int, help="default 128")
    t.add_argument("--lr", type=float, help="Adam learning rate (default per model family: mlp 1e-3, resmlp 2e-3)")
    t.add_argument("--hidden", type=int, help="MLP width, every data set (default: gmm 128, digits 256)")
    t.add_argument("--depth", type=int, help="MLP hidden layers (default 3)")
    t.add_argument("--ema-decay", type=float, help="EMA decay of the weights used for evaluation, bias-corrected "
                                                        "(default per model family: mlp 0.995, resmlp 0.999)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--evals", type=int, help="evaluation checkpoints per run (default 6)")
    e.add_argument("--eval-samples", type=int, help="samples per evaluation (default 512)")
    e.add_argument("--sampler-steps", type=_csv(int), help="sampler step counts (default 1,8,32)")
    e.add_argument("--clip", type=_csv(str), help="DDIM x0 clipping to [-1, 1] (eps re-derived) evaluated for ddpm on "
                                                 "the image data sets: off,on (default both)")
    e.add_argument("--effect-dims", type=_csv(int), help="D values of the effect-size table")
    e.add_argument("--effect-ks", type=_csv(int), help="k values of the effect-size table (default 4,64)")
    e.add_argument("--effect-coarse", type=_csv(int), help="coarse N values of the effect-size table (default 4,8)")
    e.add_argument("--no-library-timing", action="store_true", help="skip timing immiscible.select_noise")
    r = p.add_argument_group("resources and output")
    r.add_argument("--workers", type=int, help="worker processes (default: CPU cores, at most 2)")
    r.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    r.add_argument("--out", help="report folder (default immiscible-report)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_demo, preset="default")


_TRAIN_KEYS = ("steps", "batch_size", "lr", "hidden", "depth", "ema_decay", "evals", "eval_samples", "sampler_steps",
               "budgets", "clip")
_DEMO_KEYS = ("datasets", "objectives", "schedules", "models", "arms", "seeds", "base_seed", "workers", "threads",
              "out", "effect_dims", "effect_ks", "effect_coarse")


def demo_config(args):
    from .experiment import preset

    cfg = preset(args.preset)
    given = {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k) is not None}
    train = replace(cfg.train, **given)
    per_dataset = {d: {k: v for k, v in changes.items() if k not in given} for d, changes in cfg.dataset_train.items()}
    if "steps" in given and "budgets" not in given:  # keep the preset's budgets that still fit
        train = replace(train, budgets=tuple(b for b in train.budgets if b < args.steps))
        for changes in per_dataset.values():
            if "budgets" in changes:
                changes["budgets"] = tuple(b for b in changes["budgets"] if b < args.steps)
    demo = {k: getattr(args, k) for k in _DEMO_KEYS if getattr(args, k) is not None}
    grid = {d: {k: v for k, v in changes.items() if k not in demo} for d, changes in cfg.dataset_grid.items()}
    cfg = replace(cfg, train=train, dataset_train=per_dataset, dataset_grid=grid, **demo)
    if args.no_library_timing:
        cfg = replace(cfg, library_timing=False)
    if args.resume:
        cfg = replace(cfg, resume=True)
    return cfg.validate()


def _demo(args) -> int:
    from .experiment import format_effect_table, run_demo
    from .experiment.report import findings_table

    cfg = demo_config(args)
    command = "python -m immiscible_lab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_demo(cfg, command=command, progress=not args.no_progress)
    print("\nEffect size: distance reduction, noise std and cosine against D and k "
          "(standard-normal latents, immiscible.select_noise)\n")
    print(format_effect_table(result["effect"]))
    print("\nRobust findings: median change against vanilla over each row's cells; **bold** = robust (one sign in "
          "every cell of budget, schedule, clipping, model and size; pooled paired t-test, Benjamini-Hochberg "
          "q = 0.05)\n")
    print("\n".join(findings_table(result["robustness"])))
    print(f"\nReport: {cfg.out}/report.md ({len(result['files'])} files, {result['wall_seconds']:.0f} s)")
    return 0


def _add_effect(sub):
    from .experiment.effect import DEFAULT_BUDGET, DEFAULT_DIMS, DEFAULT_KS

    p = sub.add_parser(
        "effect", help="print the effect-size table: distance reduction, noise std and cosine vs D and k",
        description="Monte Carlo with immiscible.select_noise on standard-normal latents: how much closer the "
                    "chosen noise is to the latent than random noise, its std and its cosine with the latent, "
                    "for each D and k (knn) and for assign (k=1, a batch permutation).")
    p.add_argument("--dims", type=_csv(int), default=DEFAULT_DIMS, help="D values (default %(default)s)")
    p.add_argument("--ks", type=_csv(int), default=DEFAULT_KS, help="knn k values (default %(default)s)")
    p.add_argument("--metrics", type=_csv(str), default=("l2",), help="comma list of l2,cosine (default l2)")
    p.add_argument("--coarse", type=_csv(int), default=(),
                   help="also knn-l2 rows ranked after NxN pooling, for each N (e.g. 4,8; latents shaped as images)")
    p.add_argument("--assign-batch", type=int, default=64, help="batch of the assign rows; 0 = none (default 64)")
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                   help="candidate elements per cell; sets the knn batch (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    p.set_defaults(func=_effect)


def _effect(args) -> int:
    import torch

    from .experiment import effect_table, format_effect_table

    torch.set_num_threads(args.threads)
    rows = effect_table(args.dims, args.ks, metrics=args.metrics, assign_batch=args.assign_batch or None,
                        budget=args.budget, seed=args.seed, coarse=args.coarse)
    print(json.dumps(rows, indent=1) if args.json else format_effect_table(rows))
    return 0


def _add_replot(sub):
    p = sub.add_parser(
        "replot", help="draw a written report's summary figure and robustness matrices again from its report.md",
        description="Read the robustness and per-cell tables of one or more report.md files that 'demo' wrote and "
                    "draw summary.png and robustness_<family>.png again (into each report's folder, or --out). "
                    "With --summary, also draw one summary figure of all the reports together, one colour per "
                    "(report, data family): how the README's figure is made from committed reports.")
    p.add_argument("reports", nargs="+", help="report.md files")
    p.add_argument("--out", help="folder for the per-report figures (default: each report's folder)")
    p.add_argument("--no-per-report", action="store_true", help="draw only the --summary figure")
    p.add_argument("--summary", help="path of a summary figure over every report given")
    p.add_argument("--label", action="append", default=[],
                   help="name of the n-th report in the --summary legend (repeat; '{family}' stands for the data "
                        "family; default: the folder name, after the family where the report has several)")
    p.add_argument("--families", type=_csv(str), help="data families of the --summary figure (default all)")
    p.add_argument("--title", help="title of the --summary figure")
    p.set_defaults(func=_replot)


def _replot(args) -> int:
    import os

    from .experiment import plots
    from .experiment.report import read_report_md, redraw

    rows = []
    for i, path in enumerate(args.reports):
        if not args.no_per_report:
            for f in redraw(path, args.out):
                print(f)
        label = args.label[i] if i < len(args.label) else os.path.basename(os.path.dirname(os.path.abspath(path)))
        with open(path, encoding="utf-8") as f:
            parsed = read_report_md(f.read())
        families = {r["family"] for r in parsed["robustness"]}
        for r in parsed["robustness"]:
            if args.families and r["family"] not in args.families:
                continue
            series = (label.format(family=r["family"]) if "{family}" in label
                      else label if len(families) == 1 else f"{r['family']}: {label}")
            rows.append(dict(r, series=series))
    if args.summary:
        out_dir, name = os.path.split(os.path.abspath(args.summary))
        os.makedirs(out_dir, exist_ok=True)
        print(plots.plot_summary(rows, out_dir, name=name, title=args.title))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m immiscible_lab",
        description="Immiscible diffusion noise assignment. Commands: 'demo' runs the built-in A/B experiment "
                    "(does pairing noise with latents help small diffusion models?) and 'effect' prints how large "
                    "the pairing's effect on distances is for a given latent size D and candidate count k; 'replot' "
                    "draws a written report's summary and robustness figures again from its report.md.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="{demo,effect,replot}")
    _add_demo(sub)
    _add_effect(sub)
    _add_replot(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, ImportError) as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
