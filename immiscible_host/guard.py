"""The first-step guard: a run that asked for selection never trains a step on stock noise.

:func:`wrap_backward` wraps a host's once-per-step call that comes before the optimizer step
(accelerate's ``Accelerator.backward`` in sd-scripts and musubi-tuner) so that its first call asks
:meth:`Runtime.check_first_step` whether the run's first draw went through the selection.
"""
from __future__ import annotations

import functools

from .patching import mark


def _text(value) -> str:
    return value() if callable(value) else value


def wrap_backward(original, runtime, where, version="unknown", advice=""):
    """``backward(self, loss, ...)`` that checks the first step before it runs.

    ``where``, ``version`` and ``advice`` are strings or zero-argument callables (read once, at
    the first call), so the adapter can name the running script and the host program's version.
    """

    @functools.wraps(original)
    def backward(self, *a, **kw):
        if not runtime.first_step_checked:
            runtime.check_first_step(_text(where), _text(version), _text(advice))
        return original(self, *a, **kw)

    return mark(backward, original)
