"""The ``--immiscible_*`` options: argparse registration, validation and the start-up summary.

``--config_file`` TOML values bypass argparse's ``type=`` and ``choices=``, so ``settings_from_args``
checks every value's type and range itself and names the key in its error.
"""
from __future__ import annotations

import argparse
import numbers
from dataclasses import dataclass

K_MAX = 65536  # immiscible._checks.MAX_K
MODES = ("knn", "assign")
METRICS = ("l2", "cosine")
BACKENDS = ("auto", "torch", "triton")

#: Every key this pack adds to an sd-scripts argument namespace, with its default.
DEFAULTS = {
    "immiscible_k": 1,
    "immiscible_mode": "knn",
    "immiscible_metric": "l2",
    "immiscible_backend": "auto",
    "immiscible_validation": False,
}


@dataclass(frozen=True)
class Settings:
    k: int = 1
    mode: str = "knn"
    metric: str = "l2"
    backend: str = "auto"
    validation: bool = False

    @property
    def enabled(self) -> bool:
        return self.k > 1

    def metadata(self) -> dict[str, str]:
        """The ``ss_immiscible_*`` keys written into saved models (only when enabled)."""
        if not self.enabled:
            return {}
        return {
            "ss_immiscible_k": str(self.k),
            "ss_immiscible_mode": self.mode,
            "ss_immiscible_metric": self.metric,
            "ss_immiscible_validation": str(self.validation),
        }


def add_immiscible_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options (idempotent: a parser that has them already is left alone)."""
    if any("--immiscible_k" in a.option_strings for a in parser._actions):
        return
    parser.add_argument(
        "--immiscible_k",
        type=int,
        default=1,
        help="Immiscible Diffusion: pair each latent with the nearest of K Gaussian noise candidates; "
        "1 = off (default). "
        "Recommended 64 for SD1.x/SD2.x/SDXL, 4 for flow-matching models (FLUX, SD3, Lumina) "
        "/ Immiscible Diffusion：各latentをK個のガウスノイズ候補のうち最も近いものと組み合わせる。1で無効（デフォルト）。"
        "SD1.x/SD2.x/SDXLは64、flow matchingモデル（FLUX、SD3、Lumina）は4を推奨",
    )
    parser.add_argument(
        "--immiscible_mode",
        type=str,
        default="knn",
        choices=MODES,
        help="knn: nearest of K candidates per sample, works at batch size 1 "
        "(recommended, Improved Immiscible Diffusion); "
        "assign: linear assignment of the batch to a pool of K x batch candidates (original paper, needs scipy) "
        "/ knn：サンプルごとにK個の候補から最も近いものを選ぶ。バッチサイズ1でも有効（推奨）。"
        "assign：K×バッチ個の候補プールにバッチを線形割り当てする（原論文。scipyが必要）",
    )
    parser.add_argument(
        "--immiscible_metric",
        type=str,
        default="l2",
        choices=METRICS,
        help="distance used to choose the noise: l2 (default, as in the papers) "
        "or cosine (keeps the noise norm exactly Gaussian) "
        "/ ノイズ選択に使う距離：l2（デフォルト、論文と同じ）またはcosine（ノイズのノルムをガウス分布のまま保つ）",
    )
    parser.add_argument(
        "--immiscible_backend",
        type=str,
        default="auto",
        choices=BACKENDS,
        help="auto: fused Triton kernel on CUDA when triton is installed, else torch (recommended); torch; triton "
        "/ auto：CUDAでtritonが使える場合はTritonカーネル、それ以外はtorch（推奨）。torch、triton",
    )
    parser.add_argument(
        "--immiscible_validation",
        action="store_true",
        help="also select the noise of validation passes (default: validation noise stays stock, so validation losses "
        "stay comparable across runs) / 検証時のノイズにも選択を適用する（デフォルトでは検証ノイズは通常のまま"
        "で、検証lossを実行間で比較できる）",
    )


def _int_in_range(key: str, value, lo: int, hi: int, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{key} must be an integer in [{lo}, {hi}]{note}, got {value!r} ({type(value).__name__})")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{key} must be in [{lo}, {hi}]{note}, got {value}")
    return int(value)


def _choice(key: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _flag(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated :class:`Settings` from an sd-scripts namespace (CLI and/or ``--config_file``).

    Raises ``TypeError``/``ValueError`` naming the key and its allowed range.
    """
    get = lambda key: getattr(args, key, DEFAULTS[key])  # noqa: E731
    k = _int_in_range("immiscible_k", get("immiscible_k"), 1, K_MAX, " (1 = off)")
    return Settings(
        k=k,
        mode=_choice("immiscible_mode", get("immiscible_mode"), MODES),
        metric=_choice("immiscible_metric", get("immiscible_metric"), METRICS),
        backend=_choice("immiscible_backend", get("immiscible_backend"), BACKENDS),
        validation=_flag("immiscible_validation", get("immiscible_validation")),
    )


def check_upstream_overlap(args: argparse.Namespace, settings: Settings) -> None:
    """Setting both ``--immiscible_k`` and upstream's ``--knn_noise_k`` (PR #2374) is an error."""
    upstream = getattr(args, "knn_noise_k", None)
    if settings.enabled and upstream not in (None, 0, 1):
        raise ValueError(
            f"--immiscible_k {settings.k} and --knn_noise_k {upstream} both select the training noise; "
            "set only one of them (--knn_noise_k is sd-scripts' own KNN selection, --immiscible_k this pack's) "
            "/ --immiscible_kと--knn_noise_kは同時に指定できません")


def summary(settings: Settings, backend: str, points: list[str]) -> str:
    """The one-line start-up summary."""
    where = ", ".join(points) if points else "none"
    val = "selected" if settings.validation else "stock"
    return (f"immiscible: k={settings.k} mode={settings.mode} metric={settings.metric} "
            f"backend={backend} (asked {settings.backend}) validation noise={val}; patch points active: {where}")
