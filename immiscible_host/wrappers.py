"""Wrapper factories every trainer adapter uses on its host's argument handling.

- :func:`adding_options`: ``add_*_args(parser, ...)`` also registers the ``--immiscible_*`` options.
- :func:`adding_options_to_result`: ``setup_parser(...) -> parser`` does the same to what it returns.
- :func:`starting_up_after_config`: ``read_config_from_file(args, parser, ...)`` then runs the
  adapter's start-up (validation names the key and the range; exit 2 through ``parser.error``).
"""
from __future__ import annotations

import functools

from .patching import mark


def adding_options(original, add_arguments):
    @functools.wraps(original)
    def wrapper(parser, *a, **kw):
        out = original(parser, *a, **kw)
        add_arguments(parser)
        return out

    return mark(wrapper, original)


def adding_options_to_result(original, add_arguments):
    @functools.wraps(original)
    def wrapper(*a, **kw):
        parser = original(*a, **kw)
        add_arguments(parser)
        return parser

    return mark(wrapper, original)


def starting_up_after_config(original, start_up):
    @functools.wraps(original)
    def wrapper(args, parser, *a, **kw):
        args = original(args, parser, *a, **kw)
        if hasattr(args, "immiscible_k"):
            start_up(args, parser)
        return args

    return mark(wrapper, original)
