"""The options as fields of a typed config object (OneTrainer's ``BaseConfig``), checked raw.

Such a program keeps its settings in one object that declares each field in three dicts,
``types``, ``nullables`` and ``default_values``, saves what is declared (a config JSON, a preset)
and loads it back with ``from_dict``, which casts each value (``int(64.5)`` is 64) and drops keys
it does not declare. :func:`declare_options` makes the options declared fields (so they load,
save and take ``--config-value``), and :func:`checked_raw` checks their raw values before the
program casts them: a bad value is kept out of the cast and recorded, and start-up stops on it
(:func:`raise_raw_errors`), naming the key and its range.
"""
from __future__ import annotations

import re
import types

import immiscible

from .options import DEFAULTS, settings_from_args

#: The options that take one of a few values -> those values (a GUI shows them as a drop-down).
CHOICES = {"immiscible_mode": immiscible.MODES, "immiscible_metric": immiscible.METRICS,
           "immiscible_backend": immiscible.BACKENDS}

#: The attribute of a config object where :func:`checked_raw`'s errors are kept (not a declared field,
#: so never saved).
RAW_ERRORS = "_immiscible_raw_errors"

_INT = re.compile(r"\s*[+-]?\d+\s*")


def declare_options(config, keys) -> None:
    """Declare ``keys`` (of :data:`immiscible_host.options.DEFAULTS`) on ``config`` with their
    defaults, unless it declares them already (a program that has such a field keeps its own)."""
    for key in keys:
        if key in config.types:
            continue
        default = DEFAULTS[key]
        setattr(config, key, default)
        config.types[key] = type(default)
        config.nullables[key] = False
        config.default_values[key] = default


def declares(config, keys) -> bool:
    declared = getattr(config, "types", None)
    return isinstance(declared, dict) and bool(keys) and all(key in declared for key in keys)


def raw_value(key: str, value):
    """``value`` as given in a config file, a preset, ``--config-value KEY=VALUE`` (a string) or a
    widget, checked against the option's type and range; ``TypeError``/``ValueError`` naming the key.

    An integer option takes an int or a string of one (what ``--config-value`` gives), never a
    fraction (the program would truncate ``64.5`` to 64) or a bool.
    """
    if isinstance(DEFAULTS[key], int) and not isinstance(DEFAULTS[key], bool) \
            and isinstance(value, str) and _INT.fullmatch(value):
        value = int(value)
    settings_from_args(types.SimpleNamespace(**{key: value}))   # raises naming the key and its range
    return value


def checked_raw(config, data, keys):
    """``data`` (a dict ``from_dict`` is about to read) without the options whose raw values are bad;
    each bad one is recorded on ``config`` (under :data:`RAW_ERRORS`, replacing an earlier error for
    that key; a good value clears it). Anything that is not a dict is returned as given."""
    if not isinstance(data, dict) or not any(key in data for key in keys):
        return data
    errors = dict(getattr(config, RAW_ERRORS, {}))
    kept = dict(data)
    for key in keys:
        if key not in data:
            continue
        try:
            kept[key] = raw_value(key, data[key])
            errors.pop(key, None)
        except (TypeError, ValueError) as exc:
            errors[key] = str(exc)
            del kept[key]
    object.__setattr__(config, RAW_ERRORS, errors)
    return kept


def raise_raw_errors(config) -> None:
    """``ValueError`` naming every option whose raw value :func:`checked_raw` refused."""
    errors = getattr(config, RAW_ERRORS, None)
    if errors:
        raise ValueError("; ".join(f"{msg} (the value was not applied)" for msg in errors.values()))
