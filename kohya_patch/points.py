"""sd-scripts' patch points: the one table the hook, the patchers, the start-up check and
``install.py --check`` are all derived from (see :mod:`immiscible_host.points`).

Line numbers in comments are kohya-ss/sd-scripts ``48d368fa``. Importing this module imports
nothing heavy.
"""
from __future__ import annotations

from immiscible_host.points import FLOW_NOISE, INLINE, SD_NOISE, SUPPORT, PatchPoint, hook_targets

#: Trainers whose noise comes from ``train_util.get_noise_noisy_latents_and_timesteps``.
SD_TRAINERS = ("train_network.py", "sdxl_train_network.py", "fine_tune.py", "sdxl_train.py", "train_db.py",
               "train_textual_inversion.py", "train_textual_inversion_XTI.py", "sdxl_train_textual_inversion.py",
               "sdxl_train_control_net.py", "sdxl_train_control_net_lllite.py",
               "sdxl_train_control_net_lllite_old.py")
#: Flow-matching trainers that call ``flux_train_utils.get_noisy_model_input_and_timesteps``.
FLUX_TRAINERS = ("flux_train.py", "flux_train_network.py", "flux_train_control_net.py",
                 "hunyuan_image_train_network.py", "anima_train.py", "anima_train_network.py")

_SUPPORT = "kohya_patch.support:"
_FLOW = "kohya_patch.noise:wrap_flow_helper"
_FLOW_PARAMS = ("latents", "noise")

POINTS: tuple[PatchPoint, ...] = (
    # every trainer's parser (train_util.py:3794); its presence tells sd-scripts' train_util from a namesake
    PatchPoint("train_util.add_training_arguments", "library.train_util", "add_training_arguments", SUPPORT,
               params=("parser",), wrapper=_SUPPORT + "wrap_add_training_arguments", identifies=True),
    # start-up validation and summary (4700, 4414)
    PatchPoint("train_util.read_config_from_file", "library.train_util", "read_config_from_file", SUPPORT,
               params=("args", "parser"), wrapper=_SUPPORT + "wrap_read_config_from_file"),
    PatchPoint("train_util.verify_training_args", "library.train_util", "verify_training_args", SUPPORT,
               params=("args",), wrapper=_SUPPORT + "wrap_verify_training_args"),
    # ss_immiscible_* metadata (3495)
    PatchPoint("train_util.get_sai_model_spec", "library.train_util", "get_sai_model_spec", SUPPORT,
               params=("args",), wrapper=_SUPPORT + "wrap_get_sai_model_spec"),
    # SD1.x/2.x/SDXL: the base draw is the function's first torch.randn_like(latents) (6071)
    PatchPoint("train_util.get_noise_noisy_latents_and_timesteps", "library.train_util",
               "get_noise_noisy_latents_and_timesteps", SD_NOISE, params=("args", "noise_scheduler", "latents"),
               needle="randn_like(latents", scripts=SD_TRAINERS, wrapper="kohya_patch.noise:wrap_sd_noise"),
    # flow matching: the caller's noise is overwritten in place (flux 471, sd3 918, lumina 807)
    PatchPoint("flux_train_utils.get_noisy_model_input_and_timesteps", "library.flux_train_utils",
               "get_noisy_model_input_and_timesteps", FLOW_NOISE, params=_FLOW_PARAMS, scripts=FLUX_TRAINERS,
               wrapper=_FLOW, identifies=True),
    PatchPoint("sd3_train_utils.get_noisy_model_input_and_timesteps", "library.sd3_train_utils",
               "get_noisy_model_input_and_timesteps", FLOW_NOISE, params=_FLOW_PARAMS,
               scripts=("sd3_train.py", "sd3_train_network.py"), wrapper=_FLOW, identifies=True),
    PatchPoint("lumina_train_util.get_noisy_model_input_and_timesteps", "library.lumina_train_util",
               "get_noisy_model_input_and_timesteps", FLOW_NOISE, params=_FLOW_PARAMS,
               scripts=("lumina_train.py", "lumina_train_network.py"), wrapper=_FLOW, identifies=True),
    # train_control_net.py draws inline in train() (461). Up to v0.9.x the file was train_controlnet.py;
    # since then train_controlnet.py is a deprecated shim that imports train() from train_control_net.
    PatchPoint("train_control_net.train (inline noise)", "train_control_net", "train", INLINE,
               needle="torch.randn_like(latents", scripts=("train_control_net.py", "train_controlnet.py"),
               aliases=("train_controlnet",)),
    # immiscible/reduction next to the loss in TensorBoard / W&B; patched when train_util is imported
    PatchPoint("accelerate.Accelerator.init_trackers", "accelerate", "Accelerator.init_trackers", SUPPORT,
               wrapper=_SUPPORT + "wrap_init_trackers", patched_with="library.train_util", in_host=False),
    # the first-step guard: every trainer calls accelerator.backward(loss) before its optimizer step; the
    # first call stops a k > 1 run whose first training draw was not selected (any drift, any unknown trainer)
    PatchPoint("accelerate.Accelerator.backward", "accelerate", "Accelerator.backward", SUPPORT,
               wrapper=_SUPPORT + "wrap_backward", patched_with="library.train_util", in_host=False),
)

#: Module the start-up hook watches -> the attribute that identifies sd-scripts' version of it.
HOOK_TARGETS = hook_targets(POINTS)

#: A version's fingerprint (:func:`kohya_patch.version.fingerprint`) -> patch points that version ships the file of, but not the point, by design -> why.
NOT_IN_VERSION = {
    "45340f13135db659": {
        "sd3_train_utils.get_noisy_model_input_and_timesteps":
            "b8896aad's prototype sd3_train.py draws and mixes its noise inline (no helper to wrap), so it "
            "refuses --immiscible_k > 1 at start-up; no kohya_ss GUI release launches it",
    },
}
