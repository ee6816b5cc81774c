"""musubi-tuner's patch points: the one table the hook, the patchers, the start-up check and
``install.py --check`` are all derived from (see :mod:`immiscible_host.points`).

Module names are import names; files are relative to musubi-tuner's ``src/``. Line numbers in
comments are kohya-ss/musubi-tuner ``30c658c4`` (v0.3.4). Importing this module imports nothing heavy.
"""
from __future__ import annotations

from immiscible_host.points import INLINE, SUPPORT, PatchPoint, hook_targets

#: LoRA trainers: all draw their noise in the shared ``NetworkTrainer._run_training_loop``.
LORA_TRAINERS = (
    "hv_train_network.py", "hv_1_5_train_network.py", "wan_train_network.py", "fpack_train_network.py",
    "flux_kontext_train_network.py", "flux_2_train_network.py", "flux_2_train_network_self_flow.py",
    "qwen_image_train_network.py", "kandinsky5_train_network.py", "krea2_train_network.py",
    "zimage_train_network.py", "ideogram4_train_network.py", "hidream_o1_train_network.py")

_S = "musubi_patch.support:"
_PC = "musubi_tuner.training.parser_common"
_SAI = "musubi_tuner.utils.sai_model_spec"   # imported by every trainer, LoRA and full fine-tune
_NEEDLE = "noise = torch.randn_like(latents)"

POINTS: tuple[PatchPoint, ...] = (
    # options: setup_parser_common() looks _add_training_args up as a module global (parser_common.py:764)
    PatchPoint("parser_common._add_training_args", _PC, "_add_training_args", SUPPORT, params=("parser",),
               wrapper=_S + "wrap_add_training_args", identifies=True),
    # --config_file and start-up (780); scripts bind it by name, so it is patched when parser_common loads
    PatchPoint("parser_common.read_config_from_file", _PC, "read_config_from_file", SUPPORT,
               params=("args", "parser"), wrapper=_S + "wrap_read_config_from_file"),
    # ss_immiscible_* metadata: every save_model calls sai_model_spec.build_metadata (148)
    PatchPoint("sai_model_spec.build_metadata", _SAI, "build_metadata", SUPPORT, params=("architecture",),
               wrapper=_S + "wrap_build_metadata", identifies=True),
    # a second start-up check every trainer passes before any model loads (config_utils.py:222)
    PatchPoint("config_utils.BlueprintGenerator.generate", "musubi_tuner.dataset.config_utils",
               "BlueprintGenerator.generate", SUPPORT, params=("argparse_namespace",),
               wrapper=_S + "wrap_generate", patched_with=_SAI),
    # hv_train.py (HunyuanVideo full fine-tune) has its own parser and config reader (1194, 1678)
    PatchPoint("hv_train.setup_parser", "musubi_tuner.hv_train", "setup_parser", SUPPORT,
               wrapper=_S + "wrap_setup_parser", identifies=True),
    PatchPoint("hv_train.read_config_from_file", "musubi_tuner.hv_train", "read_config_from_file", SUPPORT,
               params=("args", "parser"), wrapper=_S + "wrap_read_config_from_file"),
    # THE shared draw of every LoRA trainer (trainer_base.py:2039), after scale_shift_latents
    PatchPoint("trainer_base.NetworkTrainer._run_training_loop (inline noise)", "musubi_tuner.training.trainer_base",
               "NetworkTrainer._run_training_loop", INLINE, needle=_NEEDLE, scripts=LORA_TRAINERS),
    # full fine-tunes draw inline in their own train() (hv_train 1032, qwen_image_train 610,
    # zimage_train 521, hidream_o1_train 484)
    PatchPoint("hv_train.FineTuningTrainer.train (inline noise)", "musubi_tuner.hv_train",
               "FineTuningTrainer.train", INLINE, needle=_NEEDLE, scripts=("hv_train.py",)),
    PatchPoint("qwen_image_train.QwenImageTrainer.train (inline noise)", "musubi_tuner.qwen_image_train",
               "QwenImageTrainer.train", INLINE, needle=_NEEDLE, scripts=("qwen_image_train.py",)),
    PatchPoint("zimage_train.ZImageTrainer.train (inline noise)", "musubi_tuner.zimage_train",
               "ZImageTrainer.train", INLINE, needle=_NEEDLE, scripts=("zimage_train.py",)),
    PatchPoint("hidream_o1_train.HiDreamO1Trainer.train (inline noise)", "musubi_tuner.hidream_o1_train",
               "HiDreamO1Trainer.train", INLINE, needle=_NEEDLE, scripts=("hidream_o1_train.py",)),
    # immiscible/reduction next to the loss in the trackers
    PatchPoint("accelerate.Accelerator.init_trackers", "accelerate", "Accelerator.init_trackers", SUPPORT,
               wrapper=_S + "wrap_init_trackers", patched_with=_SAI, in_host=False),
    # the first-step guard: every trainer calls accelerator.backward(loss) before its optimizer step
    PatchPoint("accelerate.Accelerator.backward", "accelerate", "Accelerator.backward", SUPPORT,
               wrapper=_S + "wrap_backward", patched_with=_SAI, in_host=False),
)

#: Module the start-up hook watches -> the attribute that identifies musubi-tuner's version of it.
HOOK_TARGETS = hook_targets(POINTS)
#: The shared LoRA draw: intercepted whenever selection is on (an unknown trainer built on the base
#: loop is then selected too; one that is not stops at its first step).
BASE_LOOP = POINTS[6]
#: The point whose first call checks that the run's first draw was selected.
GUARD = POINTS[-1].name
