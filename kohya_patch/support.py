"""Wrappers of sd-scripts' support points: options, config file, start-up, metadata, trackers.

- ``train_util.add_training_arguments``: also registers the ``--immiscible_*`` options.
- ``train_util.read_config_from_file`` / ``verify_training_args``: run :func:`.preflight.start_up`.
- ``train_util.get_sai_model_spec``: adds ``ss_immiscible_*`` to saved models' metadata.
- ``accelerate.Accelerator.init_trackers``: trackers log ``immiscible/reduction`` (and the running
  count of stock batches, ``immiscible/stock_batches``) with the loss.
- ``accelerate.Accelerator.backward``: its first call stops a run that asked for selection when the
  first training batch did not go through it (:func:`immiscible_host.guard.wrap_backward`).

Each is a factory ``wrap_*(original, point)`` named in :mod:`.points`.
"""
from __future__ import annotations

import functools
import sys

from immiscible_host import guard, telemetry, wrappers
from immiscible_host.options import with_metadata
from immiscible_host.patching import mark

from . import preflight
from .options import add_arguments
from .runtime import RUNTIME
from .version import running_root, running_version


def wrap_add_training_arguments(original, point=None):
    return wrappers.adding_options(original, add_arguments)


def wrap_read_config_from_file(original, point=None):
    return wrappers.starting_up_after_config(original, preflight.start_up)


def wrap_verify_training_args(original, point=None):
    @functools.wraps(original)
    def verify_training_args(args, *a, **kw):
        out = original(args, *a, **kw)
        if hasattr(args, "immiscible_k"):
            preflight.start_up(args)
        return out

    return mark(verify_training_args, original)


def wrap_get_sai_model_spec(original, point=None):
    """``get_sai_model_spec(state_dict, args, ...)``: the spec plus ``ss_immiscible_*`` (not with --no_metadata)."""
    @functools.wraps(original)
    def get_sai_model_spec(*a, **kw):
        args = a[1] if len(a) > 1 else kw.get("args")
        return with_metadata(original(*a, **kw), RUNTIME.settings, bool(getattr(args, "no_metadata", False)),
                             stock_batches=RUNTIME.stock_batches)

    return mark(get_sai_model_spec, original)


def wrap_init_trackers(original, point=None):
    return telemetry.wrap_init_trackers(original, RUNTIME)


def advice() -> str:
    """What to do when selection cannot be applied (the end of every such error)."""
    root = running_root()
    return (f"Run `python install.py --check --sd-scripts {root or 'PATH/TO/sd-scripts'} --python {sys.executable}` "
            "from the immiscible-diffusion pack and, if it shows nothing BROKEN, open an issue with its output; "
            "or train without --immiscible_k.")


def wrap_backward(original, point=None):
    """``Accelerator.backward``: the first call checks that the run's first draw was selected."""
    return guard.wrap_backward(original, RUNTIME, lambda: preflight.running_script() or "this sd-scripts trainer",
                               running_version, advice)
