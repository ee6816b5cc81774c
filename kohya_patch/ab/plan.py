"""What an A/B runs: the arms of each seed, each an sd-scripts config file, from the user's own command.

Pure functions of the parsed command (an ``argparse.Namespace`` from the trainer's own parser and
config file) and the A/B options; nothing here starts a process. :func:`arm_settings` is the one
place that says what differs between arms (``--seed`` by seed, ``--immiscible_*`` by arm) and what
the A/B fixes for every run (validation seed, split and schedule, sample seeds, outputs, no upload).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from immiscible_host.options import DEFAULTS as IMMISCIBLE_DEFAULTS

#: How an error writing into ``--out`` ends (``envinstall.write_atomic``'s ``hint``).
OUT_HINT = "choose another --out"

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

#: NetworkTrainer scripts: the trainers with a validation loop (sd-scripts from the kohya_ss GUI v25.0 pin).
VALIDATING_TRAINERS = ("train_network.py", "sdxl_train_network.py", "flux_train_network.py", "sd3_train_network.py",
                       "lumina_train_network.py", "hunyuan_image_train_network.py", "anima_train_network.py")
#: The first sd-scripts with a validation loss, as the kohya_ss GUI names it.
FIRST_VALIDATING_VERSION = "v0.9.1-457-g8ebe858f (the kohya_ss GUI v25.0 pin 8ebe858f)"
#: The arms of a seed, in the order they run.
CONTROL, TREATMENT = "control", "treatment"
ARMS = (CONTROL, TREATMENT)
#: Keys never written into an arm's config: the config file itself, secrets, anything that uploads.
DROPPED_KEYS = ("config_file", "output_config", "wandb_api_key", "huggingface_repo_id", "huggingface_repo_type",
                "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility",
                "save_state_to_huggingface", "resume_from_huggingface", "async_upload")
#: What the A/B sets when the command has no validation of its own.
DEFAULT_VALIDATION_SPLIT = 0.1
DEFAULT_VALIDATIONS = 5         # validation passes over a run: every max(1, steps // 5) steps
DEFAULT_VALIDATION_SEED = 3407
DEFAULT_SAMPLE_SEED = 1234


class PlanError(ValueError):
    """The command or the options cannot make a fair A/B (the message names the option)."""


@dataclass(frozen=True)
class Command:
    """The user's training command split at its script: ``launcher script args``."""
    launcher: tuple[str, ...]
    script: str
    args: tuple[str, ...]

    @property
    def trainer(self) -> str:
        return os.path.basename(self.script)


def split_command(argv) -> Command:
    """``[launcher..., SCRIPT.py, args...]`` (``python train_network.py ...``, ``accelerate launch ...``)."""
    argv = list(argv)
    if not argv:
        raise PlanError("no training command: put it after `--`, for example `python -m kohya_patch.ab --k 4 -- "
                        "accelerate launch train_network.py --config_file my_lora.toml`")
    for i, tok in enumerate(argv):
        if tok.endswith(".py"):
            return Command(tuple(argv[:i]), tok, tuple(argv[i + 1:]))
    raise PlanError(f"the command after `--` names no training script (a .py file such as train_network.py): "
                    f"{' '.join(argv)}")


def check_trainer(trainer: str, patched: set[str], has_validation: bool, samples: bool) -> bool:
    """Whether the A/B can compare validation losses for ``trainer`` (False: samples only); raises
    :class:`PlanError` when it can compare nothing."""
    if trainer not in patched:
        raise PlanError(f"{trainer} is not a trainer this pack patches, so the treatment arm could not select "
                        f"its noise; the A/B runs the sd-scripts network trainers with validation: "
                        f"{', '.join(VALIDATING_TRAINERS)}")
    validates = trainer in VALIDATING_TRAINERS and has_validation
    if validates:
        return True
    why = (f"{trainer} has no validation loop (only the network trainers do: {', '.join(VALIDATING_TRAINERS)})"
           if trainer not in VALIDATING_TRAINERS else
           f"this sd-scripts has no validation loss (--validation_split; the first version with one is "
           f"{FIRST_VALIDATING_VERSION})")
    if not samples:
        raise PlanError(f"{why}, so there is no loss to compare; give --sample_prompts for a samples-only A/B, "
                        "or use a network trainer of a newer sd-scripts")
    return False


def dataset_validation(dataset_config: dict | None) -> tuple[bool, bool]:
    """``(has a validation split, has fine-tuning metadata)`` of a ``--dataset_config`` TOML's dict."""
    if not dataset_config:
        return False, False
    split, metadata = False, False
    general = dataset_config.get("general", {}) or {}
    split |= float(general.get("validation_split", 0) or 0) > 0
    for ds in dataset_config.get("datasets", []) or []:
        split |= float(ds.get("validation_split", 0) or 0) > 0
        for sub in ds.get("subsets", []) or []:
            metadata |= bool(sub.get("metadata_file"))
            split |= float(sub.get("validation_split", 0) or 0) > 0
    return split, metadata


def read_toml(path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def check_validation_data(args, dataset_config: dict | None) -> bool:
    """Whether the command already splits off validation images; raises :class:`PlanError` when its
    data are fine-tuning metadata (``in_json`` / ``metadata_file``), whose datasets ignore the split."""
    has_split, metadata = dataset_validation(dataset_config)
    if getattr(args, "in_json", None) or metadata:
        raise PlanError("the dataset is a fine-tuning dataset (--in_json or a subset's metadata_file); sd-scripts "
                        "ignores validation_split for it, so the validation images would be training images and "
                        "the validation loss would measure memorisation. Use a DreamBooth-style dataset (image_dir "
                        "with captions) for the A/B")
    return has_split or float(getattr(args, "validation_split", 0) or 0) > 0


@dataclass(frozen=True)
class Options:
    """The A/B's own options (see ``python -m kohya_patch.ab --help``)."""
    treatment: dict                    # immiscible_* keys of the treatment arm
    seeds: tuple[int, ...]
    steps: int | None = None
    validation_seed: int = DEFAULT_VALIDATION_SEED
    validation_split: float = DEFAULT_VALIDATION_SPLIT
    validate_every_n_steps: int | None = None
    sample_seed: int = DEFAULT_SAMPLE_SEED
    self_test: bool = False


@dataclass
class Arm:
    seed: int
    name: str
    dir: Path
    settings: dict
    command: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"seed {self.seed} {self.name}"


def steps_of(args, opts: Options) -> int | None:
    """The optimizer steps of each run: ``--steps``, else the command's ``max_train_steps`` unless it
    trains by epochs (None: known only once a run has trained)."""
    if opts.steps is not None:
        return opts.steps
    if getattr(args, "max_train_epochs", None):
        return None
    return getattr(args, "max_train_steps", None)


def validation_settings(args, opts: Options, has_split: bool, validates: bool) -> tuple[dict, list[str]]:
    """What the A/B adds so that both arms validate alike, and the log lines that say so."""
    if not validates:
        return {}, []
    out, notes = {"validation_seed": opts.validation_seed}, []
    if not has_split:
        out["validation_split"] = opts.validation_split
        notes.append(f"the command has no validation split: validation_split = {opts.validation_split} "
                     f"(--validation_split)")
    every_steps = opts.validate_every_n_steps
    if every_steps is None and not (getattr(args, "validate_every_n_steps", None)
                                    or getattr(args, "validate_every_n_epochs", None)):
        steps = steps_of(args, opts)
        every_steps = max(1, (steps or DEFAULT_VALIDATIONS) // DEFAULT_VALIDATIONS)
        notes.append(f"the command has no validation schedule: validate_every_n_steps = {every_steps} "
                     "(--validate_every_n_steps), plus sd-scripts' validation at each epoch end")
    if every_steps is not None:
        out["validate_every_n_steps"] = every_steps
    return out, notes


def arm_settings(base: dict, seed: int, arm: str, arm_dir: Path, opts: Options, fixed: dict) -> dict:
    """The full config of one arm: the user's settings, ``fixed`` (the same in every run), the seed,
    the arm's ``--immiscible_*`` and its own output folders."""
    s = {k: v for k, v in base.items() if k not in DROPPED_KEYS and not k.startswith("immiscible_")}
    s.update(fixed)
    s["seed"] = seed
    s["output_dir"] = str(arm_dir / "model")
    s["logging_dir"] = str(arm_dir / "logs")
    s["output_name"] = base.get("output_name") or "lora"
    if opts.steps is not None:
        s["max_train_steps"] = opts.steps
        s.pop("max_train_epochs", None)
    s.update(IMMISCIBLE_DEFAULTS)
    if arm == TREATMENT and not opts.self_test:
        s.update(opts.treatment)
    s["immiscible_validation"] = False
    return s


def namespace_settings(args, defaults: dict) -> dict:
    """The parsed command as config keys: every value that is set and differs from the parser's default."""
    out = {}
    for key, value in vars(args).items():
        if value is None or (key in defaults and defaults[key] == value and not key.startswith("immiscible_")):
            continue
        out[key] = str(value) if isinstance(value, os.PathLike) else value
    return out


# --------------------------------------------------------------------------- config files


def toml_value(value) -> str:
    """One TOML value (bool, int, float, str, list of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise PlanError(f"cannot write {type(value).__name__} value {value!r} into a config file")


def toml_text(settings: dict, header: str = "") -> str:
    """A flat TOML document (sd-scripts' ``--config_file`` reads top-level keys as they are)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{key} = {toml_value(value)}" for key, value in sorted(settings.items()) if value is not None]
    return "\n".join(lines) + "\n"


def seeded_prompt_line(line: str, seed: int) -> str:
    """A prompt-file line with ``--d SEED`` unless it has its own seed."""
    if " --d " in f" {line} " or any(part.strip().lower().startswith("d ") for part in line.split(" --")[1:]):
        return line
    return f"{line.rstrip()} --d {seed}"


def seeded_prompts(path: str, base_seed: int) -> tuple[str, str]:
    """The prompt file with a fixed seed for every prompt that has none (prompt ``i`` gets
    ``base_seed + i``): ``(text, file suffix)``; sd-scripts would otherwise draw each with
    ``torch.seed()`` and the two arms' samples would differ by their noise, not their LoRA."""
    if path.endswith(".txt"):
        out, i = [], 0
        with open(path, encoding="utf-8") as f:
            for line in f.read().splitlines():
                if line.strip() and not line.startswith("#"):
                    line = seeded_prompt_line(line, base_seed + i)
                    i += 1
                out.append(line)
        return "\n".join(out) + "\n", ".txt"
    if path.endswith(".toml"):
        data = read_toml(path)
        prompt = dict(data.get("prompt", {}))
        subsets = prompt.pop("subset", [])
        prompts = [dict(prompt, **sub) for sub in subsets]
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
    else:
        raise PlanError(f"--sample_prompts {path}: sd-scripts reads .txt, .toml or .json prompt files")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(seeded_prompt_line(p, base_seed + i))
        else:
            out.append(p if p.get("seed") is not None else dict(p, seed=base_seed + i))
    return json.dumps(out, ensure_ascii=False, indent=1) + "\n", ".json"


#: Options that make a run write a cache the later runs load: the run that writes it draws from torch's
#: generator while encoding (the VAE's ``latent_dist.sample()``), the later ones do not, so the first arm
#: would not share the others' random streams. A 1-step warm-up run fills the cache first.
DISK_CACHES = ("cache_latents_to_disk", "cache_text_encoder_outputs_to_disk")
WARMUP = "cache-warmup"


def needs_warmup(args) -> bool:
    return any(getattr(args, key, False) for key in DISK_CACHES)


def warmup_arm(control: Arm) -> Arm:
    """The control's run cut to 1 step with no validation pass and no samples, in its own folder: it
    writes the disk caches every arm then loads."""
    d = control.dir.parent / WARMUP
    s = {k: v for k, v in control.settings.items()
         if k not in ("sample_prompts", "validate_every_n_steps", "max_train_epochs", "sample_at_first")}
    s.update(max_train_steps=1, validate_every_n_epochs=10**9, output_dir=str(d / "model"),
             logging_dir=str(d / "logs"))
    command = [str(d / "config.toml") if c == str(control.dir / "config.toml") else c for c in control.command]
    return Arm(control.seed, WARMUP, d, s, command)


def fingerprint(arms) -> str:
    """What a finished arm's marker must match for a resume to trust it: every arm's config and command."""
    h = hashlib.sha256()
    for arm in arms:
        h.update(json.dumps([arm.seed, arm.name, arm.settings, arm.command], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
