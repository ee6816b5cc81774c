"""``python -m kohya_patch.ab [A/B options] -- TRAINING COMMAND``: train the user's own sd-scripts job with and
without noise selection, seed by seed, and answer from its validation loss and samples.

For each seed the control arm (``--immiscible_k 1``) and the treatment arm (the A/B's ``--k``,
``--mode``, ...) run the same command with one config file each under ``--out``: the same fixed
validation seed, split and schedule, a fixed seed per sample prompt, no hub upload, their own
LoRA, logs and samples. Running the same command again resumes at the first unfinished arm.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import immiscible
from immiscible_host.envinstall import write_atomic
from immiscible_host.record import RECORD_ENV, RECORD_FILE, read_rows

from ..host import ADAPTER, HOST, POINTS
from . import analysis, plan, report
from .plan import ARMS, OUT_HINT, Arm, PlanError

EXAMPLE = ("python -m kohya_patch.ab --k 4 --seeds 3 --steps 500 --out ab-report -- "
           "accelerate launch train_network.py --config_file my_lora.toml")
#: The run folder's finished-arm marker (written atomically after the trainer exited 0).
MARKER = "done.json"
TAIL_LINES = 40
#: Seconds between looks at the running arm's record (progress).
POLL_S = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kohya_patch.ab", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train your own sd-scripts job with and without noise selection, seed by seed, and compare "
                    "its validation loss and samples.",
        epilog=f"example:\n  {EXAMPLE}\n\nThe training command comes last, after `--`; everything before it is the "
               "A/B's. Costs 2 x seeds trainings. See docs/sd-scripts.md, 'Measure it on your data'.")
    t = p.add_argument_group("the treatment arm (the control arm is --immiscible_k 1)")
    t.add_argument("--k", type=int, default=None, help=f"--immiscible_k of the treatment, {immiscible.K_MIN + 1}.."
                   f"{immiscible.K_MAX} (1 only with --self_test)")
    t.add_argument("--mode", default="knn", help=f"--immiscible_mode: {', '.join(immiscible.MODES)} (default knn)")
    t.add_argument("--metric", default="l2", help=f"--immiscible_metric: {', '.join(immiscible.METRICS)} (default l2)")
    t.add_argument("--coarse", type=int, default=0, help="--immiscible_coarse: 0 (off) or N (default 0)")
    t.add_argument("--backend", default="auto", help=f"--immiscible_backend: {', '.join(immiscible.BACKENDS)}")
    t.add_argument("--scope", default="rank", help=f"--immiscible_scope: {', '.join(immiscible.SCOPES)} (default rank)")
    a = p.add_argument_group("the A/B")
    a.add_argument("--seeds", type=int, default=3, help="seeds, each one control and one treatment training "
                   "(default 3; 5 recommended; fewer than 3 give no interval)")
    a.add_argument("--first_seed", type=int, default=None, help="the first --seed (default: the command's --seed, "
                   "else 42); the others follow it")
    a.add_argument("--steps", type=int, default=None, help="--max_train_steps of every run (default: the command's; "
                   "replaces its max_train_epochs)")
    a.add_argument("--out", default="ab-report", help="folder of the runs and the report (default ab-report)")
    a.add_argument("--validation_seed", type=int, default=None, help="--validation_seed of every run (default: the "
                   f"command's, else {plan.DEFAULT_VALIDATION_SEED})")
    a.add_argument("--validation_split", type=float, default=plan.DEFAULT_VALIDATION_SPLIT,
                   help="validation_split when the command and its dataset config have none (default 0.1)")
    a.add_argument("--validate_every_n_steps", type=int, default=None, help="validation schedule when the command "
                   "has none (default: 5 passes per run)")
    a.add_argument("--last_validations", type=int, default=1, help="the effect uses the last N validation passes "
                   "(default 1: the final one)")
    a.add_argument("--sample_seed", type=int, default=plan.DEFAULT_SAMPLE_SEED, help="seed of the first sample "
                   "prompt without its own --d (the next prompt gets +1, ...; default 1234)")
    a.add_argument("--self_test", action="store_true", help="A/A: both arms --immiscible_k 1; the difference must "
                   "be exactly 0 (checks that the setup is deterministic)")
    a.add_argument("--note", default=None, help="a line at the top of the report")
    a.add_argument("--dry_run", action="store_true", help="write the plan and the config files, print the commands, "
                   "train nothing")
    return p


def split_argv(argv) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        raise PlanError(f"no training command: put it after `--`, for example `{EXAMPLE}`")
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def treatment_options(ns) -> dict:
    """The treatment's ``immiscible_*`` keys, each checked under the A/B's own option name."""
    if ns.self_test:
        if ns.k not in (None, 1):
            raise PlanError(f"--self_test runs both arms with --immiscible_k 1 (A/A); drop --k {ns.k}")
        return {"immiscible_k": 1}
    if ns.k is None:
        raise PlanError(f"--k is required: the treatment's --immiscible_k, {immiscible.K_MIN + 1}..{immiscible.K_MAX}")
    if ns.k == 1:
        raise PlanError("--k 1 is the control itself (selection off), so the A/B would compare stock with stock; "
                        f"give --k {immiscible.K_MIN + 1}..{immiscible.K_MAX}, or --self_test for an A/A check")
    return {"immiscible_k": immiscible.check_int("--k", ns.k, immiscible.K_MIN + 1, immiscible.K_MAX),
            "immiscible_mode": immiscible.check_mode(ns.mode, name="--mode"),
            "immiscible_metric": immiscible.check_metric(ns.metric, name="--metric"),
            "immiscible_coarse": immiscible.check_int("--coarse", ns.coarse, 0, immiscible.COARSE_MAX, " (0 = off)"),
            "immiscible_backend": immiscible.check_backend(ns.backend, name="--backend"),
            "immiscible_scope": immiscible.check_scope(ns.scope, name="--scope")}


def check_counts(ns) -> None:
    for name, value, lo in (("--seeds", ns.seeds, 1), ("--steps", ns.steps, 1),
                            ("--last_validations", ns.last_validations, 1),
                            ("--validate_every_n_steps", ns.validate_every_n_steps, 1)):
        if value is not None and value < lo:
            raise PlanError(f"{name} must be at least {lo}, got {value}")
    if not 0.0 < ns.validation_split < 1.0:
        raise PlanError(f"--validation_split must be between 0 and 1 (exclusive), got {ns.validation_split}")


def trainer_namespace(command: plan.Command):
    """The command parsed by the trainer's own parser and config-file reader (the pack's hook installed in
    this process, so the parser knows ``--immiscible_*``): ``(args, parser defaults)``."""
    script = os.path.abspath(command.script)
    if not os.path.isfile(script):
        raise PlanError(f"no such training script: {command.script} (run the A/B where the command itself runs)")
    ADAPTER.hook.install()
    sys.path.insert(0, os.path.dirname(script))
    g = runpy.run_path(script, run_name="kohya_patch_ab")
    setup_parser = g.get("setup_parser")
    train_util = g.get("train_util") or sys.modules.get("library.train_util")
    if setup_parser is None or train_util is None:
        raise PlanError(f"{command.trainer} has no setup_parser() or does not use library.train_util: not an "
                        "sd-scripts trainer")
    parser = setup_parser()
    defaults = vars(parser.parse_args([]))
    args = train_util.read_config_from_file(parser.parse_args(list(command.args)), parser)
    if not hasattr(args, "immiscible_k"):
        raise PlanError("the trainer's parser has no --immiscible_k: the pack's patches did not load in this Python "
                        f"({sys.executable}); install it with `python install.py --sd-scripts "
                        f"{os.path.dirname(script)} --python {sys.executable}`")
    return args, defaults


def make_plan(ns, command: plan.Command, args, defaults, out: Path):
    """``(arms, fixed settings, notes, validates)``; writes the seeded prompt file under ``out``."""
    treatment = treatment_options(ns)
    patched = {s for p in POINTS for s in p.scripts}
    samples = bool(getattr(args, "sample_prompts", None))
    validates = plan.check_trainer(command.trainer, patched, hasattr(args, "validation_split"), samples)
    has_split = False
    if validates:
        dc = plan.read_toml(args.dataset_config) if getattr(args, "dataset_config", None) else None
        has_split = plan.check_validation_data(args, dc)
    validation_seed = ns.validation_seed if ns.validation_seed is not None else (
        getattr(args, "validation_seed", None) or plan.DEFAULT_VALIDATION_SEED)
    opts = plan.Options(treatment=treatment, seeds=(), steps=ns.steps, validation_seed=validation_seed,
                        validation_split=ns.validation_split, validate_every_n_steps=ns.validate_every_n_steps,
                        sample_seed=ns.sample_seed, self_test=ns.self_test)
    fixed, notes = plan.validation_settings(args, opts, has_split, validates)
    if not validates:
        notes.append("samples only: no validation loss to compare")
    if samples:
        text, suffix = plan.seeded_prompts(args.sample_prompts, ns.sample_seed)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"sample_prompts{suffix}"
        path.write_text(text, encoding="utf-8")
        fixed["sample_prompts"] = str(path)
        notes.append(f"sample prompts without a seed get {ns.sample_seed}, {ns.sample_seed + 1}, ... ({path})")
    if any(getattr(args, k, None) for k in ("huggingface_repo_id", "save_state_to_huggingface")):
        notes.append("hub upload removed (huggingface_* options): the A/B's runs stay under --out")
    first = ns.first_seed if ns.first_seed is not None else (getattr(args, "seed", None) or 42)
    base = plan.namespace_settings(args, defaults)
    extra = ["--wandb_api_key", args.wandb_api_key] if getattr(args, "wandb_api_key", None) else []
    arms = []
    for seed in range(first, first + ns.seeds):
        for name in ARMS:
            d = out / "runs" / f"seed{seed}-{name}"
            arm = Arm(seed, name, d, plan.arm_settings(base, seed, name, d, opts, fixed))
            arm.command = [*command.launcher, command.script, "--config_file", str(d / "config.toml"), *extra]
            arms.append(arm)
    return arms, opts, notes, validates


class Progress:
    """Training steps of the running arm, counted from its record file as the trainer appends to it."""

    def __init__(self, path: Path, grad_accum: int):
        self.path, self.grad_accum, self.offset, self.calls = path, max(1, grad_accum), 0, 0

    def steps(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return 0
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        self.calls += chunk[:end].count(b'"pass": "train"')
        return self.calls // self.grad_accum


def tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class ArmFailed(RuntimeError):
    pass


def run_arm(arm: Arm, bar, done_steps: int, grad_accum: int, validates: bool = True) -> float:
    """Train one arm (its folder is made afresh); raises :class:`ArmFailed` with the trainer's own error."""
    if arm.dir.exists():
        shutil.rmtree(arm.dir)
    arm.dir.mkdir(parents=True)
    (arm.dir / "config.toml").write_text(plan.toml_text(arm.settings, f"A/B arm: {arm.label}"), encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{RECORD_ENV: str(arm.dir / "record"),
                                                     HOST.dump_env: str(arm.dir / "dump")})
    log = arm.dir / "train.log"
    progress = Progress(arm.dir / "record" / RECORD_FILE.format(rank=0), grad_accum)
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(arm.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                time.sleep(POLL_S)
                bar.n = done_steps + progress.steps()
                bar.refresh()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    wall = time.perf_counter() - t0
    bar.n = done_steps + progress.steps()
    bar.refresh()
    if proc.returncode != 0:
        raise ArmFailed(f"{arm.label} failed (exit code {proc.returncode}); its log is {log}; last lines:\n"
                        f"{tail(log)}")
    if progress.calls == 0:
        raise ArmFailed(f"{arm.label} finished but recorded no loss: the pack's hook is not active in the "
                        f"trainer's Python (install it there: python install.py --sd-scripts ROOT --python "
                        f"VENV_PYTHON), or this sd-scripts computes its loss without train_util.conditional_loss. "
                        f"Log: {log}")
    if validates and not any(r["pass"] == "val" for r in read_rows(str(arm.dir / "record"))):
        raise ArmFailed(f"{arm.label} trained but never validated (no validation loss recorded): check that its "
                        f"validation split leaves at least one image and that a validation pass falls within the "
                        f"run (validate_every_n_steps / validate_every_n_epochs). Log: {log}")
    return wall


def main(argv=None) -> int:
    t_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        own, rest = split_argv(argv) if argv and argv not in (["-h"], ["--help"]) else (argv, None)
        ns = parser.parse_args(own)
        if rest is None:
            parser.error(f"no training command: put it after `--`, for example `{EXAMPLE}`")
        check_counts(ns)
        treatment_options(ns)   # bad --k / --mode before the (slow) trainer import
        command = plan.split_command(rest)
        args, defaults = trainer_namespace(command)
        out = Path(ns.out).resolve()
        arms, opts, notes, validates = make_plan(ns, command, args, defaults, out)
    except (PlanError, ValueError, TypeError) as exc:
        print(f"kohya_patch.ab: error: {exc}", file=sys.stderr)
        return 2
    warm = plan.warmup_arm(arms[0]) if plan.needs_warmup(args) else None
    sequence = ([warm] if warm else []) + arms
    if warm:
        notes.append("disk caches (cache_latents_to_disk / cache_text_encoder_outputs_to_disk): a 1-step warm-up run "
                     "fills them first, so that every arm loads them and shares the others' random streams")
    fp = plan.fingerprint(sequence)
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    if plan_path.exists():
        old = json.loads(plan_path.read_text(encoding="utf-8")).get("fingerprint")
        if old != fp:
            print(f"kohya_patch.ab: error: --out {out} holds an A/B with another command or other options "
                  "(its plan.json differs); choose another --out, or delete that folder to start over",
                  file=sys.stderr)
            return 2
    write_atomic(plan_path, json.dumps({"fingerprint": fp, "argv": argv, "arms": [
        {"seed": a.seed, "arm": a.name, "dir": str(a.dir), "command": a.command} for a in arms]}, indent=1),
        hint=OUT_HINT)
    for note in notes:
        print(f"[ab] {note}", file=sys.stderr)
    if ns.dry_run:
        for arm in sequence:
            arm.dir.mkdir(parents=True, exist_ok=True)
            (arm.dir / "config.toml").write_text(plan.toml_text(arm.settings, f"A/B arm: {arm.label}"),
                                                 encoding="utf-8")
            print(f"{arm.label}: {' '.join(arm.command)}")
        return 0
    from tqdm import tqdm

    grad_accum = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    steps = plan.steps_of(args, opts)
    walls: dict = {}
    warm_wall = None
    bar = tqdm(total=steps * len(arms) if steps else None, unit="step", dynamic_ncols=True, desc="A/B")
    done = 0
    try:
        for i, arm in enumerate(sequence):
            marker = arm.dir / MARKER
            if marker.exists():
                m = json.loads(marker.read_text(encoding="utf-8"))
                if m.get("fingerprint") == fp:
                    if arm is warm:
                        warm_wall = m["wall_s"]
                    else:
                        walls[(arm.seed, arm.name)] = m["wall_s"]
                        done += m["steps"]
                    bar.n = done
                    bar.refresh()
                    continue
            bar.set_description(f"A/B {i + (not warm)}/{len(arms)} {arm.label}")
            wall = run_arm(arm, bar, done, grad_accum, validates and arm is not warm)
            arm_steps = Progress(arm.dir / "record" / RECORD_FILE.format(rank=0), grad_accum).steps()
            if arm is warm:
                bar.n = done
                warm_wall = wall
                write_atomic(marker, json.dumps({"fingerprint": fp, "wall_s": wall, "steps": arm_steps}),
                             hint=OUT_HINT)
                continue
            if steps is None:       # epochs: the first run says how many steps each run has
                steps = arm_steps
                bar.total = steps * len(arms)
            done += arm_steps
            walls[(arm.seed, arm.name)] = wall
            write_atomic(marker, json.dumps({"fingerprint": fp, "wall_s": wall, "steps": arm_steps}),
                             hint=OUT_HINT)
    except ArmFailed as exc:
        bar.close()
        print(f"kohya_patch.ab: {exc}\nThe finished arms are kept; run the same command again to resume.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print(f"\nkohya_patch.ab: interrupted; {len(walls)} finished arm(s) kept in {out / 'runs'}; run the same "
              "command again to resume at the first unfinished arm (it restarts from step 0)", file=sys.stderr)
        return 130
    bar.close()
    arm_dirs = {(a.seed, a.name): a.dir for a in arms}
    res = analysis.analyse(arm_dirs, walls, self_test=ns.self_test, last=ns.last_validations, grad_accum=grad_accum)
    t = opts.treatment
    meta = {"treatment": "A/A self-test (both arms --immiscible_k 1)" if ns.self_test else
            f"--immiscible_k {t['immiscible_k']} --immiscible_mode {t['immiscible_mode']} --immiscible_metric "
            f"{t['immiscible_metric']}" + (f" --immiscible_coarse {t['immiscible_coarse']}" if t["immiscible_coarse"]
                                          else "") + (f" --immiscible_scope {t['immiscible_scope']}"
                                                      if t["immiscible_scope"] != "rank" else ""),
            "note": ns.note, "command": " ".join(rest), "trainer": command.trainer,
            "version": HOST.describe(Path(os.path.abspath(command.script)).parent),
            "steps": steps, "validation_seed": opts.validation_seed, "last": ns.last_validations,
            "validation_note": "; ".join(n for n in notes if n.startswith("the command has no validation"))
                               or "the command's own split and schedule",
            "wall_arms": sum(walls.values()), "runs": len(arms), "wall_total": time.perf_counter() - t_start,
            "warmup": warm_wall}
    res["meta"] = meta
    write_atomic(out / "results.json", json.dumps(res, indent=1, default=str), hint=OUT_HINT)
    path = report.write_report(res, meta, out, arm_dirs)
    print(f"{res['verdict']}\nreport: {path}")
    if ns.self_test and not all(r.get("exactly_equal") for r in res["per_seed"].values()):
        return 1
    return 0
