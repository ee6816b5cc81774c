"""Make a host's own ``torch.randn(latents.shape, generator=step_generator)`` return the selection.

Within a :class:`SelectFirstGeneratorDraw` block, this thread's first ``torch.randn`` on the
block's generator is the base draw: it runs as the host wrote it (so the generator ends where
stock leaves it, and every later draw from it, offset noise, perturbation noise, a flow
timestep, is stock's), then ``runtime.select(latents, point, stock=that draw)`` replaces it,
seeded from the draw itself (common random numbers). A first draw of another shape is not the
base draw: the block then counts as not fired, and stock noise is used.

A repeat of the same step (the same stock draw for the same latents, as in OneTrainer's
prior-prediction branch, which runs ``predict`` twice with one seed) gets the same selection
again without a second selection being made or counted (:class:`LastSelection`).
``torch.randn`` is swapped only while at least one block is open (reference-counted).
"""
from __future__ import annotations

import threading

import torch

from .randn_like import SelectFirstRandnLike


class LastSelection:
    """The last selection one point made: its stock draw, latents and result."""

    __slots__ = ("stock", "latents", "noise")

    def __init__(self):
        self.stock = self.latents = self.noise = None

    def repeat_of(self, stock, latents):
        """The earlier selection when ``stock`` and ``latents`` equal the last ones (else None)."""
        if self.noise is None or self.stock.shape != stock.shape or self.stock.device != stock.device:
            return None
        if torch.equal(self.stock, stock) and torch.equal(self.latents, latents):
            return self.noise.clone()
        return None

    def keep(self, stock, latents, noise) -> None:
        self.stock, self.latents, self.noise = stock.detach().clone(), latents.detach().clone(), noise.detach().clone()


class GeneratorSlot:
    """One armed base draw: the latents, the step generator, the point, whether it fired."""

    __slots__ = ("latents", "generator", "point", "runtime", "last", "seen", "fired")

    def __init__(self, latents, generator, point, runtime, last: LastSelection | None = None):
        self.latents, self.generator, self.point, self.runtime = latents, generator, point, runtime
        self.last = last if last is not None else LastSelection()
        self.seen = False    # the generator's first draw happened
        self.fired = False   # ... and it was the base draw (the latents' shape), now selected or stock

    def choose(self, stock):
        """The base draw's replacement: a repeat's earlier selection, a new selection, or ``stock``."""
        self.fired = True
        noise = self.last.repeat_of(stock, self.latents)
        if noise is not None:
            return noise
        noise = self.runtime.select(self.latents, self.point, stock=stock)
        if noise is None:
            return stock
        noise = noise.to(device=stock.device, dtype=stock.dtype)
        self.last.keep(stock, self.latents, noise)
        return noise


_armed = threading.local()


def _intercepting_randn(*args, **kwargs):
    slot = getattr(_armed, "slot", None)
    stock = _intercepting_randn.__immiscible_next__(*args, **kwargs)   # the host's draw, on its generator
    if slot is not None and not slot.seen and kwargs.get("generator") is slot.generator:
        slot.seen = True
        if tuple(stock.shape) == tuple(slot.latents.shape):
            return slot.choose(stock)
    return stock


_intercepting_randn.__immiscible_next__ = torch.randn


class SelectFirstGeneratorDraw(SelectFirstRandnLike):
    """Within the block, this thread's first ``torch.randn(..., generator=generator)`` of the
    latents' shape returns the selection; the block's value is the :class:`GeneratorSlot`
    (``torch.randn`` is swapped as :class:`~immiscible_host.randn_like.SelectFirstRandnLike` swaps
    ``torch.randn_like``)."""

    _depth = 0
    swapped = "randn"
    interceptor = staticmethod(_intercepting_randn)
    armed = _armed

    def __init__(self, latents, generator, point: str, runtime, last: LastSelection | None = None):
        self.slot = GeneratorSlot(latents, generator, point, runtime, last)
