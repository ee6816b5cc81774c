"""musubi-tuner, described once for the kit (:class:`immiscible_host.adapter.Host`): its patch
points, the ``--immiscible_k`` help, the architectures whose noise selection cannot honour, its
checkout and the versions this pack was tested on.

Module names are import names; files are relative to musubi-tuner's ``src/``. Line numbers in
comments are kohya-ss/musubi-tuner ``30c658c4`` (v0.3.4). Importing this module imports nothing heavy.
"""
from __future__ import annotations

from immiscible_host.adapter import Adapter, Host
from immiscible_host.points import (CONFIG, GUARD, INLINE, METADATA, OPTIONS, OPTIONS_RESULT, START_UP, TRACKERS,
                                    PatchPoint)

#: LoRA trainers: all draw their noise in the shared ``NetworkTrainer._run_training_loop``.
LORA_TRAINERS = (
    "hv_train_network.py", "hv_1_5_train_network.py", "wan_train_network.py", "fpack_train_network.py",
    "flux_kontext_train_network.py", "flux_2_train_network.py", "flux_2_train_network_self_flow.py",
    "qwen_image_train_network.py", "kandinsky5_train_network.py", "krea2_train_network.py",
    "zimage_train_network.py", "ideogram4_train_network.py", "hidream_o1_train_network.py")

_PC = "musubi_tuner.training.parser_common"
_SAI = "musubi_tuner.utils.sai_model_spec"   # imported by every trainer, LoRA and full fine-tune
_NEEDLE = "noise = torch.randn_like(latents)"
_BASE_LOOP = "trainer_base.NetworkTrainer._run_training_loop (inline noise)"

POINTS: tuple[PatchPoint, ...] = (
    # options: setup_parser_common() looks _add_training_args up as a module global (parser_common.py:764)
    PatchPoint("parser_common._add_training_args", _PC, "_add_training_args", OPTIONS, params=("parser",),
               identifies=True),
    # --config_file and start-up (780); scripts bind it by name, so it is patched when parser_common loads
    PatchPoint("parser_common.read_config_from_file", _PC, "read_config_from_file", CONFIG,
               params=("args", "parser")),
    # ss_immiscible_* metadata: every save_model calls sai_model_spec.build_metadata (148)
    PatchPoint("sai_model_spec.build_metadata", _SAI, "build_metadata", METADATA, params=("architecture",),
               identifies=True),
    # a second start-up check every trainer passes before any model loads (config_utils.py:222)
    PatchPoint("config_utils.BlueprintGenerator.generate", "musubi_tuner.dataset.config_utils",
               "BlueprintGenerator.generate", START_UP, params=("argparse_namespace",), patched_with=_SAI),
    # hv_train.py (HunyuanVideo full fine-tune) has its own parser and config reader (1194, 1678)
    PatchPoint("hv_train.setup_parser", "musubi_tuner.hv_train", "setup_parser", OPTIONS_RESULT,
               scripts=("hv_train.py",), identifies=True),
    PatchPoint("hv_train.read_config_from_file", "musubi_tuner.hv_train", "read_config_from_file", CONFIG,
               params=("args", "parser"), scripts=("hv_train.py",)),
    # THE shared draw of every LoRA trainer (trainer_base.py:2039), after scale_shift_latents
    PatchPoint(_BASE_LOOP, "musubi_tuner.training.trainer_base", "NetworkTrainer._run_training_loop", INLINE,
               needle=_NEEDLE, scripts=LORA_TRAINERS),
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
    PatchPoint("accelerate.Accelerator.init_trackers", "accelerate", "Accelerator.init_trackers", TRACKERS,
               patched_with=_SAI, in_host=False),
    # the first-step guard: every trainer calls accelerator.backward(loss) before its optimizer step
    PatchPoint("accelerate.Accelerator.backward", "accelerate", "Accelerator.backward", GUARD,
               patched_with=_SAI, in_host=False),
)

K_HELP = (
    "Immiscible Diffusion: pair each latent with the nearest of K Gaussian noise candidates; 1 = off (default). "
    "Recommended 4 for the flow-matching models musubi-tuner trains (Wan, HunyuanVideo, FramePack, FLUX, "
    "Qwen-Image, ...) "
    "/ Immiscible Diffusion：各latentをK個のガウスノイズ候補のうち最も近いものと組み合わせる。1で無効（デフォルト）。"
    "musubi-tunerのflow matchingモデルには4を推奨")


def hidream_noise_clip(args) -> float:
    """HiDream-O1's effective ``--noise_clip_std`` (None: 2.5 for ``dev``, 0 for ``full``, as upstream)."""
    clip = getattr(args, "noise_clip_std", None)
    if clip is None:
        clip = 2.5 if getattr(args, "model_type", "full") == "dev" else 0.0
    return float(clip or 0.0)


def check_architecture(args, settings) -> None:
    """Refuse ``--immiscible_k`` > 1 where the model would see a tensor other than the selected one.

    Told apart by the options only these trainers have, so it works however the script is started.
    """
    if not settings.enabled:
        return
    k = f"--immiscible_k {settings.k}"
    if hasattr(args, "noise_clip_std") and hasattr(args, "noise_scale_start"):   # HiDream-O1 (LoRA and full)
        clip = hidream_noise_clip(args)
        if clip > 0:
            raise ValueError(
                f"{k}: HiDream-O1 clips the noise to ±{clip}·std before the model sees it (--noise_clip_std; "
                f"2.5 by default for --model_type dev), so the selection would be made on a tensor the model never "
                f"sees. Set --noise_clip_std 0 or train without --immiscible_k "
                "/ HiDream-O1のノイズクリップ中は--immiscible_kを使えません")
        if settings.metric == "l2":
            raise ValueError(
                f"{k}: HiDream-O1 multiplies the noise by noise_scale (8.0 full / 7.5 dev, "
                "--noise_scale_start/_end) before the model sees it, so an l2 pairing of the unscaled noise is not "
                "the pairing the model sees. Use --immiscible_metric cosine (scale-free: the same choice for the "
                "scaled noise) / HiDream-O1では--immiscible_metric cosineを使ってください")
    if getattr(args, "remove_first_image_from_target", False):                  # Qwen-Image layered
        raise ValueError(
            f"{k}: with --remove_first_image_from_target Qwen-Image drops layer 0 of the noise from the model "
            "input and the target (noise[:, 1:]), so the selection would pair a layer the model never sees. "
            "Train without one of the two / --remove_first_image_from_targetと--immiscible_kは同時に使えません")
    if getattr(args, "self_flow", False):                                       # FLUX.2 Self-Flow skeleton
        raise ValueError(
            f"{k}: --self_flow replaces process_batch with a skeleton upstream (NotImplementedError), so there is "
            "no noise path to select on. Train without --self_flow or without --immiscible_k")


#: sha256 (first 16 hex digits) of the patched source files (``version_files``) -> version.
KNOWN = {
    "fe14544d8b9c4f59": "v0.3.4 (commit 30c658c4, main 2026-06-24)",
}

HOST = Host(
    name="musubi-tuner", package="musubi_patch", short="musubi", points=POINTS, k_help=K_HELP,
    install_flag="--musubi-tuner", disable_env="IMMISCIBLE_MUSUBI_DISABLE", dump_env="IMMISCIBLE_MUSUBI_DUMP",
    validation_arg=None,   # no validation loop: every draw the pack sees is a training draw
    checks=(check_architecture,),
    checkout_file="src/musubi_tuner/training/trainer_base.py", source_dir="src", root_module=("musubi_tuner", 3),
    trainer_globs=("src/musubi_tuner/*_train_network*.py", "src/musubi_tuner/*_train.py"),
    version_files=("src/musubi_tuner", ("training/trainer_base.py", "training/parser_common.py",
                                        "utils/sai_model_spec.py", "dataset/config_utils.py", "hv_train.py",
                                        "qwen_image_train.py", "zimage_train.py", "hidream_o1_train.py")),
    known_versions=KNOWN, pyproject_version=True, always_intercept=_BASE_LOOP,
    unknown_trainer=("not a trainer this pack knows: with --immiscible_k > 1 it is selected if it draws its noise "
                     "in the shared training loop, else it stops before its first step"),
)

#: This process's musubi-tuner adapter: its hook, its run-time state.
ADAPTER = Adapter(HOST)
