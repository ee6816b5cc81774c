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
    "Recommended 4 for flow-matching models (FLUX, SD3, Lumina); for SD1.x/SD2.x/SDXL (eps-prediction) no "
    "recommendation: the papers released 64, our A/B found it worse "
    "/ Immiscible Diffusion：各latentをK個のガウスノイズ候補のうち最も近いものと組み合わせる。1で無効（デフォルト）。"
    "flow matchingモデル（FLUX、SD3、Lumina）は4を推奨。SD1.x/SD2.x/SDXL（ε予測）は推奨値なし（論文の値は64、当方のA/Bでは悪化）")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options on an sd-scripts parser (idempotent)."""
    add_immiscible_arguments(parser, k_help=K_HELP)


#: Options of other noise selections, each with its own "off" values (checked against ``--immiscible_k``):
#: upstream PR #2374 ``--knn_noise_k`` (1 = off), gesen2egee/Anima-Standalone-Trainer ``--knn_noise_k``
#: (0 = off), gesen2egee/sd-scripts ``--noise_selection {gaussian,knn}`` (gaussian = off).
KNN_NOISE_K_OFF = (None, 0, 1)
NOISE_SELECTION_OFF = (None, "gaussian")


def other_selection(args: argparse.Namespace) -> str | None:
    """The other noise selection switched on in ``args`` (as ``--option value``), or None."""
    selection = getattr(args, "noise_selection", None)
    knn_k = getattr(args, "knn_noise_k", None)
    if selection not in NOISE_SELECTION_OFF:
        return f"--noise_selection {selection}" + (f" (--knn_noise_k {knn_k})" if knn_k is not None else "")
    if selection is None and knn_k not in KNN_NOISE_K_OFF:
        return f"--knn_noise_k {knn_k}"
    return None


def check_upstream_overlap(args: argparse.Namespace, settings: Settings) -> None:
    """Setting ``--immiscible_k`` > 1 and another selection on (:func:`other_selection`) is an error."""
    other = other_selection(args)
    if settings.enabled and other is not None:
        raise ValueError(
            f"--immiscible_k {settings.k} and {other} both select the training noise; set only one of them "
            "(--knn_noise_k / --noise_selection are this sd-scripts' own noise selection, --immiscible_k this "
            "pack's; their off values are --knn_noise_k 1 (or 0) and --noise_selection gaussian) "
            "/ --immiscible_kと--knn_noise_k・--noise_selectionは同時に指定できません")
