"""sd-scripts, described once for the kit (:class:`immiscible_host.adapter.Host`): its patch points,
the ``--immiscible_k`` help, its start-up rule, its checkout and the versions this pack was tested on.

Line numbers in comments are kohya-ss/sd-scripts ``48d368fa``. Importing this module imports
nothing heavy: the start-up hook imports it in every interpreter of the trainer's environment.
"""
from __future__ import annotations

from pathlib import Path

from immiscible_host.adapter import Adapter, Host
from immiscible_host.points import (CONFIG, FLOW_NOISE, GUARD, INLINE, METADATA, OPTIONS, RECORD, SD_NOISE,
                                    START_UP, TRACKERS, PatchPoint)

#: Trainers whose noise comes from ``train_util.get_noise_noisy_latents_and_timesteps``.
SD_TRAINERS = ("train_network.py", "sdxl_train_network.py", "fine_tune.py", "sdxl_train.py", "train_db.py",
               "train_textual_inversion.py", "train_textual_inversion_XTI.py", "sdxl_train_textual_inversion.py",
               "sdxl_train_control_net.py", "sdxl_train_control_net_lllite.py",
               "sdxl_train_control_net_lllite_old.py")
#: Flow-matching trainers that call ``flux_train_utils.get_noisy_model_input_and_timesteps``.
FLUX_TRAINERS = ("flux_train.py", "flux_train_network.py", "flux_train_control_net.py",
                 "hunyuan_image_train_network.py", "anima_train.py", "anima_train_network.py")
_FLOW_PARAMS = ("latents", "noise")

POINTS: tuple[PatchPoint, ...] = (
    # every trainer's parser (train_util.py:3794); its presence tells sd-scripts' train_util from a namesake
    PatchPoint("train_util.add_training_arguments", "library.train_util", "add_training_arguments", OPTIONS,
               params=("parser",), identifies=True),
    # start-up validation and summary (4700, 4414)
    PatchPoint("train_util.read_config_from_file", "library.train_util", "read_config_from_file", CONFIG,
               params=("args", "parser")),
    PatchPoint("train_util.verify_training_args", "library.train_util", "verify_training_args", START_UP,
               params=("args",)),
    # ss_immiscible_* metadata (3495)
    PatchPoint("train_util.get_sai_model_spec", "library.train_util", "get_sai_model_spec", METADATA,
               params=("args",)),
    # SD1.x/2.x/SDXL: the base draw is the function's first torch.randn_like(latents) (6071)
    PatchPoint("train_util.get_noise_noisy_latents_and_timesteps", "library.train_util",
               "get_noise_noisy_latents_and_timesteps", SD_NOISE, params=("args", "noise_scheduler", "latents"),
               needle="randn_like(latents", scripts=SD_TRAINERS),
    # flow matching: the caller's noise is overwritten in place (flux 471, sd3 918, lumina 807)
    PatchPoint("flux_train_utils.get_noisy_model_input_and_timesteps", "library.flux_train_utils",
               "get_noisy_model_input_and_timesteps", FLOW_NOISE, params=_FLOW_PARAMS, scripts=FLUX_TRAINERS,
               identifies=True),
    PatchPoint("sd3_train_utils.get_noisy_model_input_and_timesteps", "library.sd3_train_utils",
               "get_noisy_model_input_and_timesteps", FLOW_NOISE, params=_FLOW_PARAMS,
               scripts=("sd3_train.py", "sd3_train_network.py"), identifies=True),
    PatchPoint("lumina_train_util.get_noisy_model_input_and_timesteps", "library.lumina_train_util",
               "get_noisy_model_input_and_timesteps", FLOW_NOISE, params=_FLOW_PARAMS,
               scripts=("lumina_train.py", "lumina_train_network.py"), identifies=True),
    # train_control_net.py draws inline in train() (461). Up to v0.9.x the file was train_controlnet.py;
    # since then train_controlnet.py is a deprecated shim that imports train() from train_control_net.
    PatchPoint("train_control_net.train (inline noise)", "train_control_net", "train", INLINE,
               needle="torch.randn_like(latents", scripts=("train_control_net.py", "train_controlnet.py"),
               aliases=("train_controlnet",)),
    # the A/B recorder (python -m kohya_patch.ab): NetworkTrainer.process_batch computes every training and
    # validation loss through it (train_network.py:464, its locals `timesteps`, `latents` and `is_train`)
    PatchPoint("train_util.conditional_loss", "library.train_util", "conditional_loss", RECORD,
               params=("model_pred", "target")),
    # immiscible/reduction next to the loss in TensorBoard / W&B; patched when train_util is imported
    PatchPoint("accelerate.Accelerator.init_trackers", "accelerate", "Accelerator.init_trackers", TRACKERS,
               patched_with="library.train_util", in_host=False),
    # the first-step guard: every trainer calls accelerator.backward(loss) before its optimizer step; the
    # first call stops a k > 1 run whose first training draw was not selected (any drift, any unknown trainer)
    PatchPoint("accelerate.Accelerator.backward", "accelerate", "Accelerator.backward", GUARD,
               patched_with="library.train_util", in_host=False),
)

K_HELP = (
    "Immiscible Diffusion: pair each latent with the nearest of K Gaussian noise candidates; "
    "1 = off (default). "
    "Recommended 4 for flow-matching models (FLUX, SD3, Lumina); for SD1.x/SD2.x/SDXL (eps-prediction) no "
    "recommendation: the papers released 64, our A/B found it worse "
    "/ Immiscible Diffusion：各latentをK個のガウスノイズ候補のうち最も近いものと組み合わせる。1で無効（デフォルト）。"
    "flow matchingモデル（FLUX、SD3、Lumina）は4を推奨。SD1.x/SD2.x/SDXL（ε予測）は推奨値なし（論文の値は64、当方のA/Bでは悪化）")

#: Options of other noise selections, each with its own "off" values (checked against ``--immiscible_k``):
#: upstream PR #2374 ``--knn_noise_k`` (1 = off), gesen2egee/Anima-Standalone-Trainer ``--knn_noise_k``
#: (0 = off), gesen2egee/sd-scripts ``--noise_selection {gaussian,knn}`` (gaussian = off).
KNN_NOISE_K_OFF = (None, 0, 1)
NOISE_SELECTION_OFF = (None, "gaussian")


def other_selection(args) -> str | None:
    """The other noise selection switched on in ``args`` (as ``--option value``), or None."""
    selection = getattr(args, "noise_selection", None)
    knn_k = getattr(args, "knn_noise_k", None)
    if selection not in NOISE_SELECTION_OFF:
        return f"--noise_selection {selection}" + (f" (--knn_noise_k {knn_k})" if knn_k is not None else "")
    if selection is None and knn_k not in KNN_NOISE_K_OFF:
        return f"--knn_noise_k {knn_k}"
    return None


def check_upstream_overlap(args, settings) -> None:
    """Setting ``--immiscible_k`` > 1 and another selection on (:func:`other_selection`) is an error."""
    other = other_selection(args)
    if settings.enabled and other is not None:
        raise ValueError(
            f"--immiscible_k {settings.k} and {other} both select the training noise; set only one of them "
            "(--knn_noise_k / --noise_selection are this sd-scripts' own noise selection, --immiscible_k this "
            "pack's; their off values are --knn_noise_k 1 (or 0) and --noise_selection gaussian) "
            "/ --immiscible_kと--knn_noise_k・--noise_selectionは同時に指定できません")


def own_selection_note(root: Path) -> list[str]:
    """``--check``'s line on a noise selection of this sd-scripts' own (PR #2374, a fork's)."""
    try:
        text = (Path(root) / "library/train_util.py").read_text(encoding="utf-8")
    except OSError:
        text = ""
    present = "--knn_noise_k" in text or "--noise_selection" in text
    return ["own noise selection (--knn_noise_k, PR #2374 or a fork's --noise_selection): "
            + ("present (setting it on together with --immiscible_k > 1 is a start-up error)" if present
               else "absent")]


#: sha256 (first 16 hex digits) of library/*.py (names and contents, sorted, LF line ends) -> version.
KNOWN = {
    "e0042d4c758189f7": "v0.8.7 (commit bfb352bc; kohya_ss GUI v24.0.0-v24.1.4)",
    "45340f13135db659": "v0.8.7-114-gb8896aad (kohya_ss GUI v24.1.5-v24.1.7)",
    "e2365faff7b37602": "v0.9.1 (commit 8f4ee8fc)",
    "648aa1e2ee587732": "v0.9.1-457-g8ebe858f (kohya_ss GUI v25.0.x)",
    "b0398ea4d8e28ef8": "v0.9.1-566-g2e0fcc50 (kohya_ss GUI v25.2.2)",
    "a4d34ddf6fc43237": "v0.10.1 (commit ae72efb9)",
    "2c657c1dca4b959b": "v0.10.1-5-g48d368fa (main, 2026-02-16)",
}

#: A version's fingerprint -> patch points that version ships the file of, but not the point, by design -> why.
NOT_IN_VERSION = {
    "45340f13135db659": {
        "sd3_train_utils.get_noisy_model_input_and_timesteps":
            "b8896aad's prototype sd3_train.py draws and mixes its noise inline (no helper to wrap), so it "
            "refuses --immiscible_k > 1 at start-up; no kohya_ss GUI release launches it",
    },
}

HOST = Host(
    name="sd-scripts", package="kohya_patch", short="kohya", points=POINTS, k_help=K_HELP,
    install_flag="--sd-scripts", disable_env="IMMISCIBLE_KOHYA_DISABLE", dump_env="IMMISCIBLE_KOHYA_DUMP",
    # sd-scripts' trainers pass is_train=False down to the noise functions in validation passes
    validation_arg="is_train", checks=(check_upstream_overlap,),
    checkout_file="library/train_util.py", root_module=("library.train_util", 2),
    trainer_globs=("*train*.py", "fine_tune.py"), version_files=("library", ("*.py",)),
    known_versions=KNOWN, not_in_version=NOT_IN_VERSION, notes=own_selection_note,
)

#: This process's sd-scripts adapter: its hook, its run-time state.
ADAPTER = Adapter(HOST)
