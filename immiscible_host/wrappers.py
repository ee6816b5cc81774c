"""The wrapper of each kind of patch point: ``FACTORIES[kind](original, point, adapter)``.

A host's table names a point's role (:mod:`immiscible_host.points`); the wrapper for that role is
here, once, for every host:

- ``OPTIONS`` / ``OPTIONS_RESULT``: the host's parser also gets the ``--immiscible_*`` options;
- ``CONFIG``: after the config file is read, start-up runs with the parser (bad values exit 2);
- ``START_UP``: start-up runs on the namespace a call every run makes receives (idempotent);
- ``METADATA``: a saved model's metadata dict gets ``ss_immiscible_*``;
- ``TRACKERS``: trackers log ``immiscible/reduction`` and ``immiscible/stock_batches``;
- ``GUARD``: the first call stops a run whose first draw was not selected;
- ``SD_NOISE``: the function's first ``torch.randn_like(latents)`` returns the selection;
- ``FLOW_NOISE``: the caller's ``noise`` is overwritten in place, so input and target agree.

With selection off every wrapper calls straight through: no random number is drawn.
"""
from __future__ import annotations

import functools
import inspect

import torch

from . import patching, telemetry
from .options import add_immiscible_arguments, with_metadata
from .patching import mark
from .points import (CONFIG, FLOW_NOISE, GUARD, METADATA, OPTIONS, OPTIONS_RESULT, RECORD, SD_NOISE, START_UP,
                     TRACKERS, PatchPoint)
from .randn_like import SelectFirstRandnLike
from .record import recording_loss


def bound_arguments(sig: inspect.Signature, a, kw) -> dict:
    """A call's arguments by parameter name (empty when they do not fit the signature: the host's
    own call then raises as it would unpatched)."""
    try:
        return sig.bind_partial(*a, **kw).arguments
    except TypeError:
        return {}


def _add_options(adapter):
    host = adapter.host
    return lambda parser: add_immiscible_arguments(parser, k_help=host.k_help,
                                                   validation=host.validation_arg is not None)


def adding_options(original, point: PatchPoint, adapter):
    """``add_*_args(parser, ...)`` also registers the options."""
    add = _add_options(adapter)

    @functools.wraps(original)
    def wrapper(parser, *a, **kw):
        out = original(parser, *a, **kw)
        add(parser)
        return out

    return mark(wrapper, original)


def adding_options_to_result(original, point: PatchPoint, adapter):
    """``setup_parser(...) -> parser``: the options go on the parser it returns."""
    add = _add_options(adapter)

    @functools.wraps(original)
    def wrapper(*a, **kw):
        parser = original(*a, **kw)
        add(parser)
        return parser

    return mark(wrapper, original)


def starting_up_after_config(original, point: PatchPoint, adapter):
    """``read_config_from_file(args, parser, ...) -> args``, then start-up through ``parser.error``."""
    @functools.wraps(original)
    def wrapper(args, parser, *a, **kw):
        args = original(args, parser, *a, **kw)
        if hasattr(args, "immiscible_k"):
            adapter.start_up(args, parser)
        return args

    return mark(wrapper, original)


def starting_up(original, point: PatchPoint, adapter):
    """A call every run makes before a model loads: start-up on its namespace (``point.params[0]``)."""
    sig = inspect.signature(original)
    param = point.params[0]

    @functools.wraps(original)
    def wrapper(*a, **kw):
        args = bound_arguments(sig, a, kw).get(param)
        if hasattr(args, "immiscible_k"):
            adapter.start_up(args)
        return original(*a, **kw)

    return mark(wrapper, original)


def adding_metadata(original, point: PatchPoint, adapter):
    """A saved model's metadata plus ``ss_immiscible_*`` (not with ``--no_metadata``: the call's own
    ``args`` when it takes them, else the run's, recorded at start-up)."""
    runtime = adapter.runtime
    sig = inspect.signature(original)

    @functools.wraps(original)
    def wrapper(*a, **kw):
        args = bound_arguments(sig, a, kw).get("args")
        no_metadata = bool(getattr(args, "no_metadata", False)) if args is not None else runtime.no_metadata
        return with_metadata(original(*a, **kw), runtime.settings, no_metadata, stock_batches=runtime.stock_batches)

    return mark(wrapper, original)


def logging_reduction(original, point: PatchPoint, adapter):
    return telemetry.wrap_init_trackers(original, adapter.runtime)


def guarding_first_step(original, point: PatchPoint, adapter):
    """``backward(self, loss, ...)``: its first call asks :meth:`Runtime.check_first_step` whether the
    run's first draw went through the selection, naming the running trainer and the host's version."""
    runtime = adapter.runtime

    @functools.wraps(original)
    def wrapper(self, *a, **kw):
        if not runtime.first_step_checked:
            runtime.check_first_step(adapter.running_script() or f"this {adapter.host.name} trainer",
                                     adapter.running_version(), adapter.advice())
        return original(self, *a, **kw)

    return mark(wrapper, original)


def selecting_first_draw(original, point: PatchPoint, adapter):
    """``get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)``: while the host's body
    runs, its first ``torch.randn_like(latents)`` returns the selection; the rest is the host's code."""
    runtime, name = adapter.runtime, point.name

    @functools.wraps(original)
    def wrapper(args, noise_scheduler, latents, *a, **kw):
        if not runtime.active(args):
            return original(args, noise_scheduler, latents, *a, **kw)
        with SelectFirstRandnLike(latents, name, runtime) as slot:
            out = original(args, noise_scheduler, latents, *a, **kw)
        if not slot.fired:
            runtime.stock(f"not-fired:{name}", "immiscible: %s no longer draws its noise with "
                          "torch.randn_like(latents); stock noise was used", name)
        return out

    return mark(wrapper, original)


def overwriting_noise(original, point: PatchPoint, adapter):
    """``get_noisy_model_input_and_timesteps(..., latents, noise, ...)``: ``noise`` is overwritten in place."""
    sig = inspect.signature(original)
    runtime, name = adapter.runtime, point.name

    @functools.wraps(original)
    def wrapper(*a, **kw):
        bound = bound_arguments(sig, a, kw)
        args, latents, noise = bound.get("args"), bound.get("latents"), bound.get("noise")
        if runtime.active(args) and isinstance(latents, torch.Tensor) and isinstance(noise, torch.Tensor):
            if noise.shape != latents.shape:
                runtime.stock(f"shape:{name}", "immiscible: %s got noise %s for latents %s; stock noise used",
                              name, tuple(noise.shape), tuple(latents.shape))
            else:
                selected = runtime.select(latents, name, stock=noise)   # noise: the caller's stock draw
                if selected is not None:
                    with torch.no_grad():
                        noise.copy_(selected)  # in place: the caller's loss target uses this tensor too
        return original(*a, **kw)

    return mark(wrapper, original)


#: Each kind of point -> the factory of its wrapper (``INLINE`` points are intercepted at start-up).
FACTORIES = {
    OPTIONS: adding_options,
    OPTIONS_RESULT: adding_options_to_result,
    CONFIG: starting_up_after_config,
    START_UP: starting_up,
    METADATA: adding_metadata,
    TRACKERS: logging_reduction,
    GUARD: guarding_first_step,
    SD_NOISE: selecting_first_draw,
    FLOW_NOISE: overwriting_noise,
    RECORD: recording_loss,
}


def patch_module(module, adapter) -> None:
    """Wrap every point of ``adapter``'s table that ``module``'s import triggers (the hook's callback)."""
    patching.patch_module(module, adapter.host.points, adapter.runtime.points,
                          lambda point, original: FACTORIES[point.kind](original, point, adapter))
