"""What of the ``--immiscible_*`` options is specific to sd-scripts: the ``--immiscible_k`` help
(its model families and recommended values) and the overlap with upstream's ``--knn_noise_k``.

The options themselves, their checks and metadata are :mod:`immiscible_host.options`.
"""
from __future__ import annotations

import argparse

from immiscible_host.options import Settings, add_immiscible_arguments

K_HELP = (
    "Immiscible Diffusion: pair each latent with the nearest of K Gaussian noise candidates; "
    "1 = off (default). "
    "Recommended 64 for SD1.x/SD2.x/SDXL, 4 for flow-matching models (FLUX, SD3, Lumina) "
    "/ Immiscible Diffusion：各latentをK個のガウスノイズ候補のうち最も近いものと組み合わせる。1で無効（デフォルト）。"
    "SD1.x/SD2.x/SDXLは64、flow matchingモデル（FLUX、SD3、Lumina）は4を推奨")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options on an sd-scripts parser (idempotent)."""
    add_immiscible_arguments(parser, k_help=K_HELP)


def check_upstream_overlap(args: argparse.Namespace, settings: Settings) -> None:
    """Setting both ``--immiscible_k`` and upstream's ``--knn_noise_k`` (PR #2374) is an error."""
    upstream = getattr(args, "knn_noise_k", None)
    if settings.enabled and upstream not in (None, 0, 1):
        raise ValueError(
            f"--immiscible_k {settings.k} and --knn_noise_k {upstream} both select the training noise; "
            "set only one of them (--knn_noise_k is sd-scripts' own KNN selection, --immiscible_k this pack's) "
            "/ --immiscible_kと--knn_noise_kは同時に指定できません")
