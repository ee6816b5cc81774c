"""The ``--immiscible_*`` options every trainer adapter adds, their checks and their metadata.

Choices and ranges come from the core's vocabulary (``immiscible.MODES``, ``K_MAX``,
``check_int``, ...). Values from a config file (a TOML read into the argparse namespace) bypass
argparse's ``type=`` and ``choices=``, so :func:`settings_from_args` checks every value's type
and range itself and names the key in its error.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass

import immiscible

#: Every key the options add to an argument namespace, with its default.
DEFAULTS = {
    "immiscible_k": 1,
    "immiscible_mode": "knn",
    "immiscible_metric": "l2",
    "immiscible_backend": "auto",
    "immiscible_coarse": 0,
    "immiscible_validation": False,
    "immiscible_scope": "rank",
}
#: Metadata keys written into saved models (kohya's ``ss_*`` convention).
METADATA_PREFIX = "ss_immiscible_"

MODE_HELP = (
    "knn: nearest of K candidates per sample, works at batch size 1 "
    "(recommended, Improved Immiscible Diffusion); "
    "assign: linear assignment of the batch to a pool of K x batch candidates (original paper, needs scipy) "
    "/ knn：サンプルごとにK個の候補から最も近いものを選ぶ。バッチサイズ1でも有効（推奨）。"
    "assign：K×バッチ個の候補プールにバッチを線形割り当てする（原論文。scipyが必要）")
METRIC_HELP = (
    "distance used to choose the noise: l2 (default, as in the papers) "
    "or cosine (keeps the noise norm exactly Gaussian) "
    "/ ノイズ選択に使う距離：l2（デフォルト、論文と同じ）またはcosine（ノイズのノルムをガウス分布のまま保つ）")
BACKEND_HELP = (
    "auto: fused Triton kernel on CUDA when triton is installed, else torch (recommended); torch; triton "
    "/ auto：CUDAでtritonが使える場合はTritonカーネル、それ以外はtorch（推奨）。torch、triton")
COARSE_HELP = (
    "coarse selection: rank the candidates by their distance to the latent after both are average-pooled to "
    "N x N (the layout only), and keep the full-resolution candidate; 0 = off (default); at most the latent's "
    "shorter side / 粗い選択：潜在と候補をN×Nに平均プーリングした距離（構図のみ）で候補を選び、元の解像度の候補を"
    "使う。0でオフ（デフォルト）。潜在の短辺以下")
SCOPE_HELP = (
    "with several processes (accelerate launch --multi_gpu): rank (default) selects each process's batch on its "
    "own; global solves one assignment of the whole global batch (every process's samples, as the paper's code "
    "does), gathered over the trainer's process group; with knn it only keys candidates by global sample index "
    "/ 複数プロセス時：rank（デフォルト）は各プロセスのバッチを個別に選択、globalは全プロセスのバッチ全体を一つの"
    "割り当てで解く（論文のコードと同じ）。knnでは候補をグローバルなサンプル番号で決めるだけ")
VALIDATION_HELP = (
    "also select the noise of validation passes (default: validation noise stays stock, so validation losses "
    "stay comparable across runs) / 検証時のノイズにも選択を適用する（デフォルトでは検証ノイズは通常のまま"
    "で、検証lossを実行間で比較できる）")


@dataclass(frozen=True)
class Settings:
    k: int = 1
    mode: str = "knn"
    metric: str = "l2"
    backend: str = "auto"
    coarse: int = 0
    validation: bool = False
    scope: str = "rank"

    @property
    def enabled(self) -> bool:
        return self.k > 1

    def metadata(self) -> dict[str, str]:
        """The ``ss_immiscible_*`` keys written into saved models (only when enabled)."""
        if not self.enabled:
            return {}
        return {
            METADATA_PREFIX + "k": str(self.k),
            METADATA_PREFIX + "mode": self.mode,
            METADATA_PREFIX + "metric": self.metric,
            METADATA_PREFIX + "coarse": str(self.coarse),
            METADATA_PREFIX + "validation": str(self.validation),
            METADATA_PREFIX + "scope": self.scope,
        }


def has_immiscible_arguments(parser: argparse.ArgumentParser) -> bool:
    return any("--immiscible_k" in a.option_strings for a in parser._actions)


def add_immiscible_arguments(parser: argparse.ArgumentParser, k_help: str, validation: bool = True) -> None:
    """Register the options (idempotent: a parser that has them already is left alone).

    ``k_help`` names the host's model families and their recommended ``k``; ``validation=False``
    leaves out ``--immiscible_validation`` for hosts without validation passes.
    """
    if has_immiscible_arguments(parser):
        return
    parser.add_argument("--immiscible_k", type=int, default=DEFAULTS["immiscible_k"], help=k_help)
    parser.add_argument("--immiscible_mode", type=str, default=DEFAULTS["immiscible_mode"], choices=immiscible.MODES,
                        help=MODE_HELP)
    parser.add_argument("--immiscible_metric", type=str, default=DEFAULTS["immiscible_metric"],
                        choices=immiscible.METRICS, help=METRIC_HELP)
    parser.add_argument("--immiscible_backend", type=str, default=DEFAULTS["immiscible_backend"],
                        choices=immiscible.BACKENDS, help=BACKEND_HELP)
    parser.add_argument("--immiscible_coarse", type=int, default=DEFAULTS["immiscible_coarse"], metavar="N",
                        help=COARSE_HELP)
    parser.add_argument("--immiscible_scope", type=str, default=DEFAULTS["immiscible_scope"], choices=immiscible.SCOPES,
                        help=SCOPE_HELP)
    if validation:
        parser.add_argument("--immiscible_validation", action="store_true", help=VALIDATION_HELP)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Validated :class:`Settings` from a namespace (command line and/or config file).

    Raises ``TypeError``/``ValueError`` naming the key and its allowed range.
    """
    get = lambda key: getattr(args, key, DEFAULTS[key])  # noqa: E731
    return Settings(
        k=immiscible.check_int("immiscible_k", get("immiscible_k"), immiscible.K_MIN, immiscible.K_MAX, " (1 = off)"),
        mode=immiscible.check_mode(get("immiscible_mode"), name="immiscible_mode"),
        metric=immiscible.check_metric(get("immiscible_metric"), name="immiscible_metric"),
        backend=immiscible.check_backend(get("immiscible_backend"), name="immiscible_backend"),
        coarse=immiscible.check_int("immiscible_coarse", get("immiscible_coarse"), 0, immiscible.COARSE_MAX,
                                    " (0 = off; N pools to N x N)"),
        validation=immiscible.check_flag("immiscible_validation", get("immiscible_validation")),
        scope=immiscible.check_scope(get("immiscible_scope"), name="immiscible_scope"),
    )


def near_misses(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Keys of ``args`` that are not one of the options but look like one (another case, ``-`` for
    ``_``, an edit or two): ``(key, the option it probably means)``.

    A trainer keeps unknown config-file keys silently, so ``immiscible_K = 8`` in a TOML would
    otherwise train on stock noise while the user believes selection is on.
    """
    found = []
    for key in vars(args):
        if key in DEFAULTS:
            continue
        normal = key.lower().replace("-", "_")
        if not normal.startswith("im") and "misc" not in normal and "misib" not in normal:
            continue
        meant = normal if normal in DEFAULTS else next(iter(difflib.get_close_matches(normal, DEFAULTS, 1, 0.85)), None)
        if meant is not None:
            found.append((key, meant))
    return found


def check_near_misses(args: argparse.Namespace) -> None:
    """``ValueError`` naming each mistyped option key and what it probably means."""
    misses = near_misses(args)
    if misses:
        keys = "; ".join(f"{key!r} (did you mean {meant}?)" for key, meant in misses)
        raise ValueError(f"unknown option {keys}: it is not one of this pack's options, and the trainer would ignore "
                         "it silently, so selection would not be what you set. Fix the key "
                         "/ オプション名の綴りを確認してください")


def with_metadata(metadata, settings: Settings | None, no_metadata: bool = False, stock_batches: int | None = None):
    """``metadata`` plus the ``ss_immiscible_*`` keys when selection is on (a new dict; else as given).

    ``stock_batches``: how many batches fell back to stock noise so far, written as
    ``ss_immiscible_stock_batches`` (left out when None).
    """
    if settings is None or not settings.enabled or no_metadata or not isinstance(metadata, dict):
        return metadata
    extra = {} if stock_batches is None else {METADATA_PREFIX + "stock_batches": str(int(stock_batches))}
    return {**metadata, **settings.metadata(), **extra}
