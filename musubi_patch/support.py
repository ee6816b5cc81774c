"""Wrappers of musubi-tuner's support points: options, config file, start-up, metadata, trackers, guard.

- ``parser_common._add_training_args`` / ``hv_train.setup_parser``: also register ``--immiscible_*``.
- ``parser_common.read_config_from_file`` / ``hv_train.read_config_from_file``: run
  :func:`.preflight.start_up` with the parser (bad values exit 2 naming the key and range).
- ``config_utils.BlueprintGenerator.generate``: start-up again (idempotent) for a run whose parser
  never went through the above (a config key read by a script run as a file).
- ``sai_model_spec.build_metadata``: ``ss_immiscible_*`` in every saved model (not with ``--no_metadata``).
- ``accelerate.Accelerator.init_trackers``: ``immiscible/reduction`` and ``immiscible/stock_batches``.
- ``accelerate.Accelerator.backward``: the first call stops a k > 1 run whose first draw was not selected.

Each is a factory ``wrap_*(original, point)`` named in :mod:`.points`.
"""
from __future__ import annotations

import functools

from immiscible_host import guard, telemetry, wrappers
from immiscible_host.options import with_metadata
from immiscible_host.patching import mark

from . import preflight
from .options import add_arguments
from .runtime import RUNTIME
from .version import running_version


def wrap_add_training_args(original, point=None):
    return wrappers.adding_options(original, add_arguments)


def wrap_setup_parser(original, point=None):
    return wrappers.adding_options_to_result(original, add_arguments)


def wrap_read_config_from_file(original, point=None):
    return wrappers.starting_up_after_config(original, preflight.start_up)


def wrap_generate(original, point=None):
    @functools.wraps(original)
    def generate(self, user_config, argparse_namespace, *a, **kw):
        if hasattr(argparse_namespace, "immiscible_k"):
            preflight.start_up(argparse_namespace)
        return original(self, user_config, argparse_namespace, *a, **kw)

    return mark(generate, original)


def wrap_build_metadata(original, point=None):
    @functools.wraps(original)
    def build_metadata(*a, **kw):
        return with_metadata(original(*a, **kw), RUNTIME.settings, preflight.STATE["no_metadata"],
                             stock_batches=RUNTIME.stock_batches)

    return mark(build_metadata, original)


def wrap_init_trackers(original, point=None):
    return telemetry.wrap_init_trackers(original, RUNTIME)


def wrap_backward(original, point=None):
    """``Accelerator.backward``: the first call checks that the run's first draw was selected."""
    return guard.wrap_backward(original, RUNTIME, lambda: preflight.running_script() or "this musubi-tuner trainer",
                               running_version, preflight.advice)
