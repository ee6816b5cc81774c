"""What of the ``--immiscible_*`` options is specific to musubi-tuner: the ``--immiscible_k`` help,
and the architectures whose noise is treated in a way that selection cannot honour (refused at
start-up with the reason; see docs/musubi-tuner.md).

The options themselves, their checks and metadata are :mod:`immiscible_host.options`.
"""
from __future__ import annotations

import argparse

from immiscible_host.options import Settings, add_immiscible_arguments

K_HELP = (
    "Immiscible Diffusion: pair each latent with the nearest of K Gaussian noise candidates; 1 = off (default). "
    "Recommended 4 for the flow-matching models musubi-tuner trains (Wan, HunyuanVideo, FramePack, FLUX, "
    "Qwen-Image, ...) "
    "/ Immiscible Diffusion：各latentをK個のガウスノイズ候補のうち最も近いものと組み合わせる。1で無効（デフォルト）。"
    "musubi-tunerのflow matchingモデルには4を推奨")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options on a musubi-tuner parser (idempotent; musubi has no validation passes)."""
    add_immiscible_arguments(parser, k_help=K_HELP, validation=False)


def hidream_noise_clip(args: argparse.Namespace) -> float:
    """HiDream-O1's effective ``--noise_clip_std`` (None: 2.5 for ``dev``, 0 for ``full``, as upstream)."""
    clip = getattr(args, "noise_clip_std", None)
    if clip is None:
        clip = 2.5 if getattr(args, "model_type", "full") == "dev" else 0.0
    return float(clip or 0.0)


def check_architecture(args: argparse.Namespace, settings: Settings) -> None:
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
