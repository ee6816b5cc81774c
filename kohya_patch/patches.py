"""Wrappers around sd-scripts' ``library`` functions. Nothing inside sd-scripts is edited.

Patch points (module attribute -> what the wrapper does):

- ``train_util.add_training_arguments``: also registers the ``--immiscible_*`` options.
- ``train_util.read_config_from_file`` / ``verify_training_args``: validate them at start-up,
  check the patch points the running script needs, log the one-line summary.
- ``train_util.get_noise_noisy_latents_and_timesteps`` (SD1/2, SDXL): while upstream's body runs,
  its base ``torch.randn_like(latents)`` draw returns the selected noise; noise offset,
  multires noise, timesteps and ``ip_noise_gamma`` then run upstream's own code.
- ``{flux,sd3}_train_utils`` / ``lumina_train_util.get_noisy_model_input_and_timesteps``: the
  caller's ``noise`` is overwritten in place (``noise.copy_``), so model input and loss target agree.
- ``train_control_net.py``'s inline ``torch.randn_like`` in ``train()``.
- ``train_util.get_sai_model_spec``: adds ``ss_immiscible_*`` to saved models' metadata.
- ``accelerate.Accelerator.init_trackers``: trackers log ``immiscible/reduction`` with the loss.

With ``--immiscible_k 1`` (or absent) every wrapper calls straight through: no RNG is touched.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import threading

import torch

from . import runtime
from .options import Settings, add_immiscible_arguments, check_upstream_overlap, settings_from_args, summary

logger = logging.getLogger(__name__)

MARK = "__immiscible_patched__"

#: name -> (module, attribute). The noise points; ``SCRIPT_POINTS`` says which script needs which.
NOISE_POINTS = {
    "train_util.get_noise_noisy_latents_and_timesteps": ("library.train_util", "get_noise_noisy_latents_and_timesteps"),
    "flux_train_utils.get_noisy_model_input_and_timesteps": ("library.flux_train_utils",
                                                             "get_noisy_model_input_and_timesteps"),
    "sd3_train_utils.get_noisy_model_input_and_timesteps": ("library.sd3_train_utils",
                                                            "get_noisy_model_input_and_timesteps"),
    "lumina_train_util.get_noisy_model_input_and_timesteps": ("library.lumina_train_util",
                                                              "get_noisy_model_input_and_timesteps"),
    "train_control_net.train (inline noise)": ("train_control_net", "train"),
}
SUPPORT_POINTS = {
    "train_util.add_training_arguments": ("library.train_util", "add_training_arguments"),
    "train_util.read_config_from_file": ("library.train_util", "read_config_from_file"),
    "train_util.verify_training_args": ("library.train_util", "verify_training_args"),
    "train_util.get_sai_model_spec": ("library.train_util", "get_sai_model_spec"),
}
_SD = "train_util.get_noise_noisy_latents_and_timesteps"
_FLUX = "flux_train_utils.get_noisy_model_input_and_timesteps"
_SD3 = "sd3_train_utils.get_noisy_model_input_and_timesteps"
_LUMINA = "lumina_train_util.get_noisy_model_input_and_timesteps"
_CN = "train_control_net.train (inline noise)"
#: Training script -> the noise patch point it draws its noise through.
SCRIPT_POINTS = {
    **{s: _SD for s in ("train_network.py", "sdxl_train_network.py", "fine_tune.py", "sdxl_train.py", "train_db.py",
                        "train_textual_inversion.py", "train_textual_inversion_XTI.py",
                        "sdxl_train_textual_inversion.py", "sdxl_train_control_net.py",
                        "sdxl_train_control_net_lllite.py", "sdxl_train_control_net_lllite_old.py")},
    **{s: _FLUX for s in ("flux_train.py", "flux_train_network.py", "flux_train_control_net.py",
                          "hunyuan_image_train_network.py", "anima_train.py", "anima_train_network.py")},
    "sd3_train.py": _SD3, "sd3_train_network.py": _SD3,
    "lumina_train.py": _LUMINA, "lumina_train_network.py": _LUMINA,
    "train_control_net.py": _CN, "train_controlnet.py": _CN,
}

#: Patch point name -> True when installed in this process, or a string saying why not.
STATUS: dict[str, object] = {}


def _mark(wrapper, original):
    setattr(wrapper, MARK, True)
    wrapper.__wrapped__ = original
    return wrapper


def _is_patched(fn) -> bool:
    return bool(getattr(fn, MARK, False))


# --------------------------------------------------------------------------- torch.randn_like interception


class _Slot:
    __slots__ = ("latents", "point", "fired")

    def __init__(self, latents, point):
        self.latents, self.point, self.fired = latents, point, False


_armed = threading.local()
_randn_like_lock = threading.Lock()
_ORIGINAL_RANDN_LIKE = torch.randn_like


def _selected_like(slot: _Slot, input, args, kwargs):
    """The selected noise for a ``torch.randn_like(input, ...)`` call, or None for stock."""
    if args or set(kwargs) - {"device", "dtype"}:
        runtime.warn_once(f"randn_like-args:{slot.point}",
                          "immiscible: %s calls torch.randn_like with arguments %s; using stock noise there",
                          slot.point, sorted(kwargs) or args)
        return None
    noise = runtime.select(input, slot.point)
    if noise is not None and kwargs:
        noise = noise.to(device=kwargs.get("device") or noise.device, dtype=kwargs.get("dtype") or noise.dtype)
    return noise


def _intercepting_randn_like(input, *args, **kwargs):
    slot = getattr(_armed, "slot", None)
    if slot is not None and not slot.fired and input is slot.latents:
        slot.fired = True
        noise = _selected_like(slot, input, args, kwargs)
        if noise is not None:
            return noise
    return _intercepting_randn_like.__immiscible_next__(input, *args, **kwargs)


_intercepting_randn_like.__immiscible_next__ = _ORIGINAL_RANDN_LIKE


class _SelectFirstRandnLike:
    """Within the block, this thread's first ``torch.randn_like(latents)`` returns the selection.

    ``torch.randn_like`` is swapped only while at least one block is open (reference-counted);
    other threads and other calls pass straight through to the previous function.
    """

    _depth = 0

    def __init__(self, latents, point):
        self.slot = _Slot(latents, point)

    def __enter__(self):
        self.prev_slot = getattr(_armed, "slot", None)
        _armed.slot = self.slot
        with _randn_like_lock:
            cls = _SelectFirstRandnLike
            if cls._depth == 0:
                _intercepting_randn_like.__immiscible_next__ = torch.randn_like
                torch.randn_like = _intercepting_randn_like
            cls._depth += 1
        return self.slot

    def __exit__(self, *exc):
        _armed.slot = self.prev_slot
        with _randn_like_lock:
            cls = _SelectFirstRandnLike
            cls._depth -= 1
            if cls._depth == 0:
                torch.randn_like = _intercepting_randn_like.__immiscible_next__
        return False


# --------------------------------------------------------------------------- noise patch points


def wrap_get_noise(original, point=_SD):
    """``get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)``: select the base draw."""

    @functools.wraps(original)
    def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents, *a, **kw):
        if not runtime.active(args):
            return original(args, noise_scheduler, latents, *a, **kw)
        with _SelectFirstRandnLike(latents, point) as slot:
            out = original(args, noise_scheduler, latents, *a, **kw)
        if not slot.fired:
            runtime.warn_once(f"not-fired:{point}", "immiscible: %s no longer draws its noise with "
                              "torch.randn_like(latents); stock noise was used", point)
        return out

    return _mark(get_noise_noisy_latents_and_timesteps, original)


def wrap_flow_helper(original, point):
    """``get_noisy_model_input_and_timesteps(..., latents, noise, ...)``: overwrite ``noise`` in place."""
    sig = inspect.signature(original)

    @functools.wraps(original)
    def get_noisy_model_input_and_timesteps(*a, **kw):
        try:
            bound = sig.bind_partial(*a, **kw).arguments
            args, latents, noise = bound.get("args"), bound.get("latents"), bound.get("noise")
        except TypeError:
            args = latents = noise = None
        if runtime.active(args) and isinstance(latents, torch.Tensor) and isinstance(noise, torch.Tensor):
            if noise.shape != latents.shape:
                runtime.warn_once(f"shape:{point}", "immiscible: %s got noise %s for latents %s; stock noise used",
                                  point, tuple(noise.shape), tuple(latents.shape))
            else:
                selected = runtime.select(latents, point)
                if selected is not None:
                    with torch.no_grad():
                        noise.copy_(selected)  # in place: the caller's loss target uses this tensor too
        return original(*a, **kw)

    return _mark(get_noisy_model_input_and_timesteps, original)


def _controlnet_caller() -> bool:
    code = sys._getframe(2).f_code
    return code.co_name == "train" and os.path.basename(code.co_filename) == "train_control_net.py"


def _persistent_randn_like(input, *args, **kwargs):
    """Installed only for train_control_net.py with k > 1: selects its inline base noise."""
    nxt = _persistent_randn_like.__immiscible_next__
    if isinstance(input, torch.Tensor) and _controlnet_caller():
        noise = _selected_like(_Slot(input, _CN), input, args, kwargs)
        if noise is not None:
            return noise
    return nxt(input, *args, **kwargs)


def install_controlnet_interception() -> None:
    if getattr(torch.randn_like, MARK, False) or torch.randn_like is _persistent_randn_like:
        return
    _persistent_randn_like.__immiscible_next__ = torch.randn_like
    setattr(_persistent_randn_like, MARK, True)
    torch.randn_like = _persistent_randn_like
    STATUS[_CN] = True


# --------------------------------------------------------------------------- start-up


def running_script() -> str:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv else "")
    return os.path.basename(path or "")


def _controlnet_point_status() -> object:
    mod = sys.modules.get("train_control_net") or sys.modules.get("__main__")
    try:
        src = inspect.getsource(mod.train)
    except Exception as exc:  # noqa: BLE001
        return f"cannot read train_control_net.train ({type(exc).__name__})"
    return True if "torch.randn_like(latents" in src else "train() no longer draws torch.randn_like(latents)"


def active_points() -> list[str]:
    return [name for name, ok in STATUS.items() if ok is True and name in NOISE_POINTS]


def start_up(args, parser=None) -> Settings:
    """Validate, check patch points, configure the run and log the summary (idempotent)."""
    fail = parser.error if parser is not None else None
    try:
        settings = settings_from_args(args)
        check_upstream_overlap(args, settings)
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        if getattr(args, "config_file", None):
            msg += f" (set in --config_file {args.config_file} or on the command line)"
        if fail:
            fail(msg)
        raise ValueError(msg) from exc
    script = running_script()
    needed = SCRIPT_POINTS.get(script)
    if needed == _CN:
        STATUS[_CN] = _controlnet_point_status()
    problem = STATUS.get(needed, "its module was not imported") if needed else None
    if problem is True:
        problem = None
    if problem is not None:
        msg = f"immiscible: patch point {needed} needed by {script} is unavailable: {problem}"
        if settings.enabled:
            if fail:
                fail(msg)
            raise ValueError(msg)
        runtime.warn_once(f"missing:{needed}", "%s (immiscible is off, carrying on)", msg)
    backend = None
    if settings.enabled:
        import immiscible

        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            backend = immiscible.resolve_backend(settings.backend, device)
        except (ImportError, ValueError) as exc:
            msg = f"--immiscible_backend {settings.backend}: {exc}"
            if fail:
                fail(msg)
            raise ValueError(msg) from exc
        if needed == _CN:
            install_controlnet_interception()
    first = runtime.STATE.settings != settings
    runtime.configure(settings, backend)
    if settings.enabled and first and runtime.distributed_rank()[0] == 0:
        logger.info(summary(settings, backend, active_points()))
    return settings


def wrap_add_training_arguments(original):
    @functools.wraps(original)
    def add_training_arguments(parser, *a, **kw):
        out = original(parser, *a, **kw)
        add_immiscible_arguments(parser)
        return out

    return _mark(add_training_arguments, original)


def wrap_read_config_from_file(original):
    @functools.wraps(original)
    def read_config_from_file(args, parser, *a, **kw):
        args = original(args, parser, *a, **kw)
        if hasattr(args, "immiscible_k"):
            start_up(args, parser)
        return args

    return _mark(read_config_from_file, original)


def wrap_verify_training_args(original):
    @functools.wraps(original)
    def verify_training_args(args, *a, **kw):
        out = original(args, *a, **kw)
        if hasattr(args, "immiscible_k"):
            start_up(args)
        return out

    return _mark(verify_training_args, original)


def wrap_get_sai_model_spec(original):
    @functools.wraps(original)
    def get_sai_model_spec(*a, **kw):
        spec = original(*a, **kw)
        s = runtime.STATE.settings
        args = a[1] if len(a) > 1 else kw.get("args")
        if s is not None and s.enabled and isinstance(spec, dict) and not getattr(args, "no_metadata", False):
            spec = {**spec, **s.metadata()}
        return spec

    return _mark(get_sai_model_spec, original)


# --------------------------------------------------------------------------- trackers


def _add_reduction(values):
    if isinstance(values, dict) and ("loss/current" in values or "loss" in values):
        red = runtime.reduction_for_log()
        if red is not None:
            return {**values, "immiscible/reduction": red}
    return values


def _wrap_tracker(tracker) -> None:
    log = getattr(tracker, "log", None)
    if log is None or _is_patched(log):
        return

    @functools.wraps(log)
    def tracker_log(values, *a, **kw):
        return log(_add_reduction(values), *a, **kw)

    try:
        tracker.log = _mark(tracker_log, log)
    except Exception:  # noqa: BLE001 - a tracker that refuses attributes just goes without
        pass


def patch_accelerate() -> None:
    try:
        from accelerate import Accelerator
    except Exception as exc:  # noqa: BLE001
        STATUS["accelerate.Accelerator.init_trackers"] = f"accelerate not importable ({type(exc).__name__})"
        return
    original = Accelerator.init_trackers
    if _is_patched(original):
        return

    @functools.wraps(original)
    def init_trackers(self, *a, **kw):
        out = original(self, *a, **kw)
        if runtime.STATE.settings is not None and runtime.STATE.settings.enabled:
            for tracker in getattr(self, "trackers", []):
                _wrap_tracker(tracker)
        return out

    Accelerator.init_trackers = _mark(init_trackers, original)
    STATUS["accelerate.Accelerator.init_trackers"] = True


# --------------------------------------------------------------------------- module patchers


def _patch_attr(module, name, attr, wrap) -> None:
    fn = getattr(module, attr, None)
    if fn is None:
        STATUS[name] = f"{module.__name__}.{attr} not found"
        return
    if not _is_patched(fn):
        setattr(module, attr, wrap(fn))
    STATUS[name] = True


def _noise_source_ok(fn, needle="randn_like(latents") -> object:
    try:
        src = inspect.getsource(getattr(fn, "__wrapped__", fn))
    except Exception as exc:  # noqa: BLE001
        return f"source unreadable ({type(exc).__name__})"
    return True if needle in src else "no torch.randn_like(latents) base draw in its source"


def patch_train_util(mod) -> None:
    """Patch ``library.train_util`` (needs ``add_training_arguments`` to be sd-scripts')."""
    if not hasattr(mod, "add_training_arguments"):
        return
    _patch_attr(mod, "train_util.add_training_arguments", "add_training_arguments", wrap_add_training_arguments)
    _patch_attr(mod, "train_util.read_config_from_file", "read_config_from_file", wrap_read_config_from_file)
    _patch_attr(mod, "train_util.verify_training_args", "verify_training_args", wrap_verify_training_args)
    _patch_attr(mod, "train_util.get_sai_model_spec", "get_sai_model_spec", wrap_get_sai_model_spec)
    _patch_attr(mod, _SD, "get_noise_noisy_latents_and_timesteps", wrap_get_noise)
    if STATUS.get(_SD) is True:
        ok = _noise_source_ok(mod.get_noise_noisy_latents_and_timesteps)
        if ok is not True:
            STATUS[_SD] = ok
    patch_accelerate()


def _patch_flow(mod, name) -> None:
    fn = getattr(mod, "get_noisy_model_input_and_timesteps", None)
    if fn is not None and not _is_patched(fn):
        params = inspect.signature(fn).parameters
        if not {"latents", "noise"} <= set(params):
            STATUS[name] = "get_noisy_model_input_and_timesteps has no (latents, noise) parameters"
            return
    _patch_attr(mod, name, "get_noisy_model_input_and_timesteps", functools.partial(wrap_flow_helper, point=name))


PATCHERS = {
    "library.train_util": patch_train_util,
    "library.flux_train_utils": lambda m: _patch_flow(m, _FLUX),
    "library.sd3_train_utils": lambda m: _patch_flow(m, _SD3),
    "library.lumina_train_util": lambda m: _patch_flow(m, _LUMINA),
}


def patch_module(mod) -> None:
    """Patch one sd-scripts module; logs, never raises."""
    patcher = PATCHERS.get(getattr(mod, "__name__", ""))
    if patcher is None:
        return
    try:
        patcher(mod)
    except Exception:  # noqa: BLE001 - a patch that fails must leave sd-scripts working
        logger.warning("immiscible: could not patch %s", mod.__name__, exc_info=True)
