"""The noise wrappers: what each kind of sd-scripts noise point needs to use the selection.

- ``train_util.get_noise_noisy_latents_and_timesteps`` (SD1/2, SDXL): while upstream's body runs,
  its base ``torch.randn_like(latents)`` draw returns the selected noise; noise offset, multires
  noise, timesteps and ``ip_noise_gamma`` then run upstream's own code.
- ``{flux,sd3}_train_utils`` / ``lumina_train_util.get_noisy_model_input_and_timesteps``: the
  caller's ``noise`` is overwritten in place (``noise.copy_``), so model input and loss target agree.
- ``train_control_net.py``'s inline ``torch.randn_like`` in ``train()``.

With ``--immiscible_k 1`` (or absent) every wrapper calls straight through: no RNG is touched.
"""
from __future__ import annotations

import functools
import inspect
import sys

import torch

from immiscible_host.patching import mark
from immiscible_host.points import PatchPoint, PointStatus, broken, check_source
from immiscible_host.randn_like import SelectFirstRandnLike, intercept_in_function

from .runtime import RUNTIME


def wrap_sd_noise(original, point: PatchPoint):
    """``get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)``: select the base draw."""
    name = point.name

    @functools.wraps(original)
    def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents, *a, **kw):
        if not RUNTIME.active(args):
            return original(args, noise_scheduler, latents, *a, **kw)
        with SelectFirstRandnLike(latents, name, RUNTIME) as slot:
            out = original(args, noise_scheduler, latents, *a, **kw)
        if not slot.fired:
            RUNTIME.stock(f"not-fired:{name}", "immiscible: %s no longer draws its noise with "
                          "torch.randn_like(latents); stock noise was used", name)
        return out

    return mark(get_noise_noisy_latents_and_timesteps, original)


def wrap_flow_helper(original, point: PatchPoint):
    """``get_noisy_model_input_and_timesteps(..., latents, noise, ...)``: overwrite ``noise`` in place."""
    sig = inspect.signature(original)
    name = point.name

    @functools.wraps(original)
    def get_noisy_model_input_and_timesteps(*a, **kw):
        try:
            bound = sig.bind_partial(*a, **kw).arguments
            args, latents, noise = bound.get("args"), bound.get("latents"), bound.get("noise")
        except TypeError:
            args = latents = noise = None
        if RUNTIME.active(args) and isinstance(latents, torch.Tensor) and isinstance(noise, torch.Tensor):
            if noise.shape != latents.shape:
                RUNTIME.stock(f"shape:{name}", "immiscible: %s got noise %s for latents %s; stock noise used",
                              name, tuple(noise.shape), tuple(latents.shape))
            else:
                selected = RUNTIME.select(latents, name)
                if selected is not None:
                    with torch.no_grad():
                        noise.copy_(selected)  # in place: the caller's loss target uses this tensor too
        return original(*a, **kw)

    return mark(get_noisy_model_input_and_timesteps, original)


# --------------------------------------------------------------------------- inline draws (train_control_net.py)


def inline_status(point: PatchPoint) -> PointStatus:
    """Read the script function's source: does it still draw ``torch.randn_like(latents)`` inline?"""
    module = next((sys.modules[m] for m in point.modules if m in sys.modules), None) or sys.modules.get("__main__")
    try:
        source = inspect.getsource(getattr(module, point.attribute))
    except Exception as exc:  # noqa: BLE001
        return broken(f"cannot read {point.module}.{point.attribute} ({type(exc).__name__})")
    return check_source(point, (), source)


def intercept_inline(point: PatchPoint) -> None:
    """Select the inline draw of ``point`` (any of its file names) from now on."""
    intercept_in_function(tuple(f.rsplit("/", 1)[-1] for f in point.files), point.attribute, point.name, RUNTIME)
