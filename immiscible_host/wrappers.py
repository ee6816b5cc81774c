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
- ``FLOW_NOISE``: the caller's ``noise`` is overwritten in place, so input and target agree;
- ``GENERATOR_NOISE``: the function's first ``torch.randn(latents.shape, generator=...)`` returns the
  selection (the generator ends where stock leaves it), except where the caller's ``host.stock_arg``
  is True (OneTrainer's deterministic validation);
- ``SCHEMA`` / ``RAW_CONFIG``: the options become fields of a typed config object, and their raw
  values are checked before the program casts them (:mod:`immiscible_host.typed_config`);
- ``SCALARS``: ``add_scalar`` of the loss also logs ``immiscible/reduction`` and the stock-batch count;
- ``UI_FRAME``: a settings frame of the program's GUI also gets the options' widgets.

With selection off every wrapper calls straight through: no random number is drawn.
"""
from __future__ import annotations

import functools
import inspect

import torch

from . import patching, telemetry, typed_config
from .generator_draw import LastSelection, SelectFirstGeneratorDraw
from .options import add_immiscible_arguments, with_metadata
from .patching import mark
from .points import (CONFIG, FLOW_NOISE, GENERATOR_NOISE, GUARD, METADATA, OPTIONS, OPTIONS_RESULT, RAW_CONFIG, RECORD,
                     SCALARS, SCHEMA, SD_NOISE, START_UP, TRACKERS, UI_FRAME, PatchPoint)
from .randn_like import SelectFirstRandnLike
from .record import caller_local, recording_loss


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


def drawing_in(block, draw: str, original, *a, **kw):
    """``original(*a, **kw)`` inside ``block`` (a :class:`SelectFirstRandnLike` or a subclass); a
    block whose draw never fired is a stock batch, counted (the host no longer draws with ``draw``)."""
    with block as slot:
        out = original(*a, **kw)
    if not slot.fired:
        slot.runtime.stock(f"not-fired:{slot.point}", "immiscible: %s no longer draws its noise with %s; stock noise "
                           "was used", slot.point, draw)
    return out


def selecting_first_draw(original, point: PatchPoint, adapter):
    """``get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents)``: while the host's body
    runs, its first ``torch.randn_like(latents)`` returns the selection; the rest is the host's code."""
    runtime, name = adapter.runtime, point.name

    @functools.wraps(original)
    def wrapper(args, noise_scheduler, latents, *a, **kw):
        if not runtime.active(args):
            return original(args, noise_scheduler, latents, *a, **kw)
        return drawing_in(SelectFirstRandnLike(latents, name, runtime), "torch.randn_like(latents)",
                          original, args, noise_scheduler, latents, *a, **kw)

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


def selecting_generator_draw(original, point: PatchPoint, adapter):
    """``_create_noise(self, source_tensor, config, generator, ...)`` (``point.params`` name the latents,
    the config and the step generator): while the host's body runs, its first draw on that generator
    of the latents' shape is the base draw and returns the selection, seeded from that draw; the
    rest (offset, perturbation noise) is the host's code on the generator where stock leaves it.
    Stock where the caller's ``host.stock_arg`` is True (validation). A repeat of the same step (the
    same stock draw for the same latents) gets the same selection, counted once."""
    sig = inspect.signature(original)
    runtime, name, stock_arg = adapter.runtime, point.name, adapter.host.stock_arg
    latents_name, config_name, generator_name = point.params[:3]
    last = LastSelection()

    @functools.wraps(original)
    def wrapper(*a, **kw):
        bound = bound_arguments(sig, a, kw)
        if not runtime.active(bound.get(config_name)) or (stock_arg and caller_local(stock_arg) is True):
            return original(*a, **kw)
        latents, generator = bound.get(latents_name), bound.get(generator_name)
        if not isinstance(latents, torch.Tensor) or not isinstance(generator, torch.Generator):
            runtime.stock(f"args:{name}", "immiscible: %s was called without latents and a torch.Generator; stock "
                          "noise was used", name)
            return original(*a, **kw)
        return drawing_in(SelectFirstGeneratorDraw(latents, generator, name, runtime, last),
                          "torch.randn(latents.shape, generator=generator)", original, *a, **kw)

    return mark(wrapper, original)


def declaring_options(original, point: PatchPoint, adapter):
    """``default_values() -> config``: the config declares ``host.config_keys`` as fields."""
    keys = adapter.host.config_keys

    @functools.wraps(original)
    def wrapper(*a, **kw):
        config = original(*a, **kw)
        typed_config.declare_options(config, keys)
        return config

    return mark(wrapper, original)


def checking_raw_options(original, point: PatchPoint, adapter):
    """``from_dict(self, data, ...)``: the options' raw values are checked before the host casts them;
    a bad one is left out and recorded, and start-up stops on it (a config without the options is
    read as the host reads it)."""
    keys = adapter.host.config_keys

    @functools.wraps(original)
    def wrapper(self, data, *a, **kw):
        if typed_config.declares(self, keys):
            data = typed_config.checked_raw(self, data, keys)
        return original(self, data, *a, **kw)

    return mark(wrapper, original)


def logging_reduction_scalar(original, point: PatchPoint, adapter):
    """``add_scalar(self, tag, value, step, ...)``: a loss tag (``host.loss_tags``) also logs
    ``immiscible/reduction`` and ``immiscible/stock_batches`` at that step (k > 1 only)."""
    runtime, tags = adapter.runtime, tuple(adapter.host.loss_tags)

    @functools.wraps(original)
    def wrapper(self, tag, scalar_value, global_step=None, *a, **kw):
        out = original(self, tag, scalar_value, global_step, *a, **kw)
        if runtime.enabled and tag in tags:
            values = telemetry.add_reduction({tag: scalar_value}, runtime.window, loss_keys=tags, step=global_step,
                                             extra=lambda: {telemetry.STOCK_KEY: runtime.stock_batches})
            for key, value in values.items():
                if key != tag:
                    original(self, key, value, global_step)
        return out

    return mark(wrapper, original)


class RecordingComponents:
    """A GUI's widget factory (OneTrainer's ``components`` module) that keeps the first section frame
    made through it and the last grid row used in that frame."""

    def __init__(self, inner):
        self.inner, self.frame, self.last_row = inner, None, -1

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if not callable(fn):
            return fn

        def call(*a, **kw):
            out = fn(*a, **kw)
            if name == "section_frame" and self.frame is None:
                self.frame = out
            elif self.frame is not None and len(a) > 1 and a[0] is self.frame and isinstance(a[1], int):
                self.last_row = max(self.last_row, a[1])
            return out

        return call


def add_fields(components, frame, row: int, ui_state, fields) -> int:
    """``fields`` (``(key, label, tooltip)``) as rows of ``frame`` from ``row`` on: a label and a
    drop-down of the option's choices (``typed_config.CHOICES``) or an entry; returns the next free row."""
    for key, label, tooltip in fields:
        components.label(frame, row, 0, label, tooltip=tooltip)
        if key in typed_config.CHOICES:
            components.options(frame, row, 1, list(typed_config.CHOICES[key]), ui_state, key)
        else:
            components.entry(frame, row, 1, ui_state, key)
        row += 1
    return row


def adding_ui_fields(original, point: PatchPoint, adapter):
    """``create_frame(self, master, row, ui_state, ...)`` drawing through ``self.components``: the frame
    it makes also gets ``host.ui_fields`` below its own rows (a GUI that cannot take them is left as
    it was, with a warning)."""
    sig = inspect.signature(original)
    fields, runtime = adapter.host.ui_fields, adapter.runtime

    @functools.wraps(original)
    def wrapper(self, *a, **kw):
        ui_state = bound_arguments(sig, (self, *a), kw).get("ui_state")
        components = getattr(self, "components", None)
        recording = RecordingComponents(components)
        self.components = recording
        try:
            out = original(self, *a, **kw)
        finally:
            self.components = components
        if recording.frame is not None and ui_state is not None:
            try:
                add_fields(components, recording.frame, recording.last_row + 1, ui_state, fields)
            except Exception as exc:  # noqa: BLE001 - never break the host's GUI
                runtime.warn_once(f"ui:{point.name}", "immiscible: could not add the options to %s (%s: %s)",
                                  point.name, type(exc).__name__, exc)
        return out

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
    GENERATOR_NOISE: selecting_generator_draw,
    SCHEMA: declaring_options,
    RAW_CONFIG: checking_raw_options,
    SCALARS: logging_reduction_scalar,
    UI_FRAME: adding_ui_fields,
}


def patch_module(module, adapter) -> None:
    """Wrap every point of ``adapter``'s table that ``module``'s import triggers (the hook's callback)."""
    patching.patch_module(module, adapter.host.points, adapter.runtime.points,
                          lambda point, original: FACTORIES[point.kind](original, point, adapter))
