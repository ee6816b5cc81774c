"""OneTrainer, described once for the kit (:class:`immiscible_host.adapter.Host`): its patch points,
the options' help and GUI widgets, its start-up rules, its checkout and the version this pack was
tested on.

OneTrainer is configured by a typed config object (``TrainConfig``) rather than argparse, draws
each step's noise from a per-step ``torch.Generator`` in one mixin that all its model families
share, validates with ``predict(..., deterministic=True)``, saves through its own savers and steps
without accelerate; each of those is a kind of point of the kit (``SCHEMA``, ``RAW_CONFIG``,
``GENERATOR_NOISE``, ``SCALARS``, ``UI_FRAME``). Line numbers in comments are Nerogar/OneTrainer
``23df3832``. Importing this module imports nothing heavy.
"""
from __future__ import annotations

from pathlib import Path

from immiscible_host.adapter import Adapter, Host
from immiscible_host.points import (GENERATOR_NOISE, GUARD, METADATA, RAW_CONFIG, SCALARS, SCHEMA, START_UP, UI_FRAME,
                                    PatchPoint)

#: The scripts that train: the CLI and the GUIs (train_ui.py is the Qt GUI's old name, kept for launchers).
TRAINERS = ("train.py", "train_ui.py", "train_ui_qt.py", "train_ui_ctk.py")

_TRAIN_CONFIG = "modules.util.config.TrainConfig"
_TRAINER = "modules.trainer.GenericTrainer"

POINTS: tuple[PatchPoint, ...] = (
    # the options as TrainConfig fields (TrainConfig.py:1008), so they load from and save to a config JSON
    # or preset, show in the GUI and take --config-value KEY=VALUE
    PatchPoint("TrainConfig.default_values", _TRAIN_CONFIG, "TrainConfig.default_values", SCHEMA, identifies=True),
    # their raw values checked before from_dict casts them (BaseConfig.py:120-136: int(64.5) is 64, a bad
    # value prints "Could not set" and keeps the default); only configs that declare the options
    PatchPoint("BaseConfig.from_dict", "modules.util.config.BaseConfig", "BaseConfig.from_dict", RAW_CONFIG,
               params=("data",), patched_with=_TRAIN_CONFIG),
    # start-up: the CLI and the GUI both build a GenericTrainer before any model loads (GenericTrainer.py:71)
    PatchPoint("GenericTrainer.__init__", _TRAINER, "GenericTrainer.__init__", START_UP, params=("config",),
               identifies=True),
    # THE base draw of every model family (ModelSetupNoiseMixin.py:86): all 17 setups' predict() call
    # _create_noise(latents, config, step_generator, ...); offset (:94) and perturbation (:112) noise follow
    # on the same generator. Patched with GenericTrainer, which every training run imports first.
    PatchPoint("ModelSetupNoiseMixin._create_noise", "modules.modelSetup.mixin.ModelSetupNoiseMixin",
               "ModelSetupNoiseMixin._create_noise", GENERATOR_NOISE, params=("source_tensor", "config", "generator"),
               needle="torch.randn(", scripts=TRAINERS, patched_with=_TRAINER),
    # ss_immiscible_* in every safetensors header OneTrainer writes (LoRA savers; DtypeModelSaverMixin.py:83)
    PatchPoint("DtypeModelSaverMixin._create_safetensors_header", "modules.modelSaver.mixin.DtypeModelSaverMixin",
               "DtypeModelSaverMixin._create_safetensors_header", METADATA, params=("model",), patched_with=_TRAINER),
    # the first-step guard: called once per training step after the loss's backward and before the optimizer
    # step (GenericTrainer.py:767), never in validation nor on the prior-prediction branch's no-grad predict
    PatchPoint("multi_gpu_util.reduce_tensor_mean", "modules.util.multi_gpu_util", "reduce_tensor_mean", GUARD,
               params=("tensor",), patched_with=_TRAINER),
    # immiscible/reduction beside loss/train_step in OneTrainer's TensorBoard (GenericTrainer.py:806)
    PatchPoint("tensorboard.SummaryWriter.add_scalar", "torch.utils.tensorboard.writer", "SummaryWriter.add_scalar",
               SCALARS, params=("tag", "scalar_value", "global_step"), patched_with=_TRAINER, in_host=False),
    # the GUI: the options below the noise settings (BaseTrainingTabView.py:714, a private method; the Qt and
    # the Ctk GUI both build the tab through it)
    PatchPoint("BaseTrainingTabView.__create_noise_frame", "modules.ui.BaseTrainingTabView",
               "BaseTrainingTabView._BaseTrainingTabView__create_noise_frame", UI_FRAME,
               params=("master", "row", "ui_state"), identifies=True),
)

#: The options OneTrainer's TrainConfig gets (``immiscible_backend`` stays ``auto``: Triton on CUDA when
#: installed; validation noise stays stock, as OneTrainer's validation is deterministic).
CONFIG_KEYS = ("immiscible_k", "immiscible_mode", "immiscible_metric", "immiscible_coarse")

K_HELP = (
    "Immiscible Diffusion: pair each latent with the nearest of K Gaussian noise candidates; 1 = off (default). "
    "Recommended 4 for flow-matching models (FLUX, SD3, Chroma, Qwen, ...); for SD1.x/SD2.x/SDXL (eps-prediction) "
    "no recommendation: the papers released 64, this pack's A/B found it worse. The effect is small and falls "
    "with the latent's size; measure it on your own data.")
MODE_TIP = ("knn: the nearest of K candidates per sample, works at batch size 1 (recommended); assign: a linear "
            "assignment of the batch to K x batch candidates (the original paper; needs scipy)")
METRIC_TIP = ("Distance that picks the noise: l2 (the papers') also favours slightly shorter noise; cosine picks "
              "the most aligned candidate and keeps the noise norm exactly Gaussian")
COARSE_TIP = ("Rank the candidates by their distance to the latent after average-pooling both to N x N (the "
              "layout only) and keep the full-resolution candidate; 0 = off. At most the latent's shorter side")

#: The GUI's widgets, below OneTrainer's noise settings: (config key, label, tooltip); an option with
#: choices (mode, metric) is a drop-down of the core's choices, the others are entries.
UI_FIELDS = (
    ("immiscible_k", "Immiscible K", K_HELP),
    ("immiscible_mode", "Immiscible Mode", MODE_TIP),
    ("immiscible_metric", "Immiscible Metric", METRIC_TIP),
    ("immiscible_coarse", "Immiscible Coarse", COARSE_TIP),
)


def check_raw_values(config, settings) -> None:
    """A value OneTrainer would have cast or dropped (``64.5``, ``"abc"``) stops the run, naming the key."""
    from immiscible_host.typed_config import raise_raw_errors

    raise_raw_errors(config)


def check_k_noise_sampling(config, settings) -> None:
    """OneTrainer PR #1260's own selection (``k_noise_sampling``, off at 1 or 0) and ``immiscible_k`` > 1
    both on is an error naming both."""
    other = getattr(config, "k_noise_sampling", None)
    if settings.enabled and other not in (None, 0, 1):
        raise ValueError(
            f"immiscible_k {settings.k} and k_noise_sampling {other} (\"Noise Oversampling\", OneTrainer PR #1260) "
            "both select the training noise; set only one of them (k_noise_sampling's off value is 1, "
            "immiscible_k's is 1)")


def own_selection_note(root: Path) -> list[str]:
    """``--check``'s line on PR #1260's ``k_noise_sampling`` in this checkout."""
    try:
        text = (Path(root) / "modules/util/config/TrainConfig.py").read_text(encoding="utf-8")
    except OSError:
        text = ""
    return ["own noise selection (k_noise_sampling, PR #1260): "
            + ("present (setting it on together with immiscible_k > 1 is a start-up error)"
               if "k_noise_sampling" in text else "absent")]


#: sha256 (first 16 hex digits) of the patched files (``version_files``) -> version. OneTrainer has no
#: version string.
KNOWN = {
    "5cf1aec0b02e2650": "commit 23df3832 (master, 2026-08-19)",
}

HOST = Host(
    name="OneTrainer", package="onetrainer_patch", short="onetrainer", points=POINTS, k_help=K_HELP,
    install_flag="--onetrainer", disable_env="IMMISCIBLE_ONETRAINER_DISABLE", dump_env="IMMISCIBLE_ONETRAINER_DUMP",
    validation_arg=None,   # validation is predict(..., deterministic=True): stock_arg below keeps it stock
    checks=(check_raw_values, check_k_noise_sampling),
    checkout_file="modules/modelSetup/mixin/ModelSetupNoiseMixin.py",
    root_module=("modules.modelSetup.mixin.ModelSetupNoiseMixin", 4),
    trainer_globs=("scripts/train.py", "scripts/train_ui*.py"),
    version_files=("modules", ("modelSetup/mixin/ModelSetupNoiseMixin.py", "util/config/BaseConfig.py",
                               "util/config/TrainConfig.py", "trainer/GenericTrainer.py", "util/multi_gpu_util.py",
                               "modelSaver/mixin/DtypeModelSaverMixin.py", "ui/BaseTrainingTabView.py")),
    known_versions=KNOWN, notes=own_selection_note,
    config_keys=CONFIG_KEYS, stock_arg="deterministic", loss_tags=("loss/train_step",), ui_fields=UI_FIELDS,
)

#: This process's OneTrainer adapter: its hook, its run-time state.
ADAPTER = Adapter(HOST)
