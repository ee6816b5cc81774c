"""Make a host's own ``torch.randn_like(latents)`` return the selected noise.

Two ways, so that none of the host's code is re-implemented:

- :class:`SelectFirstRandnLike`, a block around a call into the host: within it, this thread's
  first ``torch.randn_like(latents)`` on that very tensor returns the selection. ``torch.randn_like``
  is swapped only while at least one block is open;
- :func:`intercept_in_function`, for a draw written inline in a script function: from then on,
  ``torch.randn_like`` called directly from that function (by file name and function name)
  returns the selection. Every other caller gets the previous function.

Both let the host's own draw run first, so the host's random streams are exactly stock's at any
``k`` (common random numbers: timesteps, shuffles and every later draw equal a ``k = 1`` run's),
then ask ``runtime.select(latents, point, stock=that draw)`` (an
:class:`immiscible_host.runtime.Runtime`), which seeds the selection from the stock draw, and
fall back to that stock draw, counting the batch, when the call has arguments they cannot honour.
"""
from __future__ import annotations

import os
import sys
import threading

import torch

from .hook import MARK


class Slot:
    """One armed draw: the latents it is for, the point's name, whether it has fired."""

    __slots__ = ("latents", "point", "runtime", "fired")

    def __init__(self, latents, point, runtime):
        self.latents, self.point, self.runtime, self.fired = latents, point, runtime, False


def selected_like(slot: Slot, input, args, kwargs, stock):
    """The noise a ``torch.randn_like(input, ...)`` call returns: the selection, seeded from the
    ``stock`` draw the host's call has already made, or that stock draw itself."""
    if args or set(kwargs) - {"device", "dtype"}:
        slot.runtime.stock(f"randn_like-args:{slot.point}",
                           "immiscible: %s calls torch.randn_like with arguments %s; using stock noise there",
                           slot.point, sorted(kwargs) or args)
        return stock
    noise = slot.runtime.select(input, slot.point, stock=stock)
    if noise is None:
        return stock
    return noise.to(device=stock.device, dtype=stock.dtype)


# --------------------------------------------------------------------------- within a block

_armed = threading.local()
_lock = threading.Lock()


def _intercepting_randn_like(input, *args, **kwargs):
    slot = getattr(_armed, "slot", None)
    stock = _intercepting_randn_like.__immiscible_next__(input, *args, **kwargs)  # the host's stream, as stock
    if slot is not None and not slot.fired and input is slot.latents:
        slot.fired = True
        return selected_like(slot, input, args, kwargs, stock)
    return stock


_intercepting_randn_like.__immiscible_next__ = torch.randn_like


class SelectFirstRandnLike:
    """Within the block, this thread's first ``torch.randn_like(latents)`` returns the selection.

    ``torch.randn_like`` is swapped only while at least one block is open (reference-counted);
    other threads and other calls pass straight through to the previous function. The block's
    value is the :class:`Slot`; ``slot.fired`` says whether the draw happened.

    A subclass swaps another torch function the same way: it names it (``swapped``), its
    interceptor (which calls ``interceptor.__immiscible_next__``), its thread-local ``armed`` that
    the interceptor reads the slot from, and its own ``_depth = 0``.
    """

    _depth = 0
    swapped = "randn_like"
    interceptor = staticmethod(_intercepting_randn_like)
    armed = _armed

    def __init__(self, latents, point: str, runtime):
        self.slot = Slot(latents, point, runtime)

    def __enter__(self):
        cls = type(self)
        self.prev_slot = getattr(cls.armed, "slot", None)
        cls.armed.slot = self.slot
        with _lock:
            if cls._depth == 0:
                cls.interceptor.__immiscible_next__ = getattr(torch, cls.swapped)
                setattr(torch, cls.swapped, cls.interceptor)
            cls._depth += 1
        return self.slot

    def __exit__(self, *exc):
        cls = type(self)
        cls.armed.slot = self.prev_slot
        with _lock:
            cls._depth -= 1
            if cls._depth == 0:
                setattr(torch, cls.swapped, cls.interceptor.__immiscible_next__)
        return False


# --------------------------------------------------------------------------- inline in a function

#: (file base names, function name) -> (point name, runtime)
_functions: dict[tuple[frozenset, str], tuple[str, object]] = {}


def _caller_target(frame):
    code = frame.f_code
    base = os.path.basename(code.co_filename)
    for (files, function), target in _functions.items():
        if code.co_name == function and base in files:
            return target
    return None


def _function_randn_like(input, *args, **kwargs):
    """Installed by :func:`intercept_in_function`: selects the registered functions' inline draws."""
    stock = _function_randn_like.__immiscible_next__(input, *args, **kwargs)  # the host's stream, as stock
    if isinstance(input, torch.Tensor) and _functions:
        target = _caller_target(sys._getframe(1))
        if target is not None:
            point, runtime = target
            return selected_like(Slot(input, point, runtime), input, args, kwargs, stock)
    return stock


def intercept_in_function(files, function: str, point: str, runtime) -> None:
    """From now on, ``torch.randn_like(x)`` called directly in ``function`` of any of ``files``
    (base names, e.g. ``("train_control_net.py",)``) returns ``runtime.select(x, point)``.

    Idempotent; installs :func:`_function_randn_like` as ``torch.randn_like`` once per process.
    """
    _functions[(frozenset(files), function)] = (point, runtime)
    if torch.randn_like is _function_randn_like or getattr(torch.randn_like, MARK, False):
        return
    _function_randn_like.__immiscible_next__ = torch.randn_like
    setattr(_function_randn_like, MARK, True)
    torch.randn_like = _function_randn_like
