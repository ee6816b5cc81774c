"""Run-time state of a patched training process: settings, selection with fallback, statistics.

One :class:`Runtime` per adapter. Nothing here may end a training run: a selection that fails
warns once, the batch uses stock noise, and :attr:`Runtime.stock_batches` counts such batches
(by reason in :attr:`Runtime.stock_reasons`) so an adapter can report them.
"""
from __future__ import annotations

import collections
import logging
import os
import sys
import threading

import torch

import immiscible

from .options import Settings, settings_from_args
from .points import PointStatus
from .ranks import draw_rank_seed, process_group
from .telemetry import ReductionWindow, dump_row, dump_tensors

logger = logging.getLogger(__name__)


#: Why a batch with NaN or infinite latents is not selected (a data or VAE problem, not an install one).
NON_FINITE = ("immiscible: the latents at %s contain NaN or infinite values, so no noise can be selected for them; "
              "stock noise was used. This is a data or VAE problem, not an install one: check the images of this "
              "batch, and an fp16 VAE that overflows (sd-scripts: --no_half_vae; cached latents: re-cache them)")


class SelectionNotApplied(RuntimeError):
    """Selection was asked for, but the run's first draw did not go through it."""


class GroupSelectionFailed(RuntimeError):
    """``--immiscible_scope global``: a collective failed or timed out, so the process group is
    unusable and this process stops (every live process of the group raises it)."""


#: What a process says when a collective of a global selection failed (``--immiscible_scope global``).
GROUP_FAILED = ("immiscible: --immiscible_scope global: {}. A failed collective cannot be recovered, so this run stops "
                "on every process (see each process's log). Check the other processes' logs for the first error; "
                "to train on, rerun with --immiscible_scope rank")


class Runtime:
    """Settings, point statuses, selection and statistics of one adapter in this process.

    Parameters
    ----------
    dump_env : str, optional
        Environment variable naming a folder: every selection then appends a JSON line to
        ``FOLDER/rank{R}.jsonl``.
    validation_arg : str, optional
        The trainer's argument that is False during validation passes (sd-scripts: ``is_train``);
        looked for in up to ``validation_depth`` calling frames. None: the host has no validation.
    """

    def __init__(self, dump_env: str | None = None, validation_arg: str | None = None, validation_depth: int = 10):
        self.dump_env, self.validation_arg, self.validation_depth = dump_env, validation_arg, validation_depth
        #: Patch point name -> its status in this process (kept by :meth:`reset`).
        self.points: dict[str, PointStatus] = {}
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget settings and statistics (tests); point statuses stay."""
        self.settings: Settings | None = None
        self.backend: str | None = None
        self.no_metadata = False
        #: Latent shape -> the coarse size checked against it (the option itself is checked at start-up).
        self.coarse_for_shape: dict[tuple, int | None] = {}
        self.warned: set[str] = set()
        self.calls = 0
        self.stock_batches = 0
        self.stock_reasons: collections.Counter = collections.Counter()
        self.window = ReductionWindow()
        #: Why the run's first draw used stock noise (None: it was selected, or nothing was drawn yet).
        self.first_draw_stock: str | None = None
        self.first_draw_advice: str | None = None
        self.first_step_checked = False

    # ------------------------------------------------------------------ settings

    def configure(self, settings: Settings, backend: str | None = None, no_metadata: bool = False) -> None:
        """Make ``settings`` this process's settings; ``backend`` is the one start-up resolved (None:
        resolve per call), ``no_metadata`` the run's ``--no_metadata``."""
        if settings != self.settings:
            self.coarse_for_shape = {}
        self.settings, self.backend, self.no_metadata = settings, backend, no_metadata

    @property
    def enabled(self) -> bool:
        return self.settings is not None and self.settings.enabled

    def settings_for(self, args) -> Settings | None:
        """The configured settings, configuring lazily from ``args`` if start-up validation never ran.

        A start-up check that was skipped must not kill the run later: a bad value then warns
        once and disables selection.
        """
        if self.settings is None and args is not None and hasattr(args, "immiscible_k"):
            try:
                self.configure(settings_from_args(args))
            except (TypeError, ValueError) as exc:
                self.warn_once("lazy-config", "immiscible: %s; using stock noise", exc)
                self.configure(Settings())
        return self.settings

    def active(self, args) -> bool:
        s = self.settings_for(args)
        return s is not None and s.enabled

    # ------------------------------------------------------------------ warnings and fallback

    def warn_once(self, key: str, msg: str, *fmt) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(msg, *fmt)

    def stock(self, reason: str, msg: str, *fmt, advice: str | None = None) -> None:
        """A batch that should have been selected uses stock noise: count it, warn once per reason.

        ``advice``: what to do when the batch or a setting is at fault (NaN latents, a coarse size
        larger than the latent), not the install; the first-step guard then says this instead of
        the install advice.
        """
        with self.lock:
            self.stock_batches += 1
            self.stock_reasons[reason] += 1
            if self.calls == 0 and self.first_draw_stock is None:
                self.first_draw_stock = msg % fmt if fmt else msg
                self.first_draw_advice = advice
        self.warn_once(reason, msg, *fmt)

    def check_first_step(self, where: str, version: str = "unknown", advice: str = "") -> None:
        """Stop the run before its first optimizer step when selection was asked for but its first
        draw did not go through it (a missing or renamed patch point, a changed signature, noise
        drawn some other way, an unknown trainer, a selection that failed).

        The adapter calls this from a hook that runs once per step before the optimizer (e.g.
        accelerate's ``backward``). Only the first call checks; later transient failures keep the
        warn-once-and-count fallback. Raises :class:`SelectionNotApplied`.
        """
        if self.first_step_checked:
            return
        self.first_step_checked = True
        if not self.enabled or self.in_validation():
            return
        if self.calls > 0 and self.first_draw_stock is None:
            return
        why = self.first_draw_stock or ("no noise draw went through the selection: this trainer draws its noise "
                                        "in a way the pack does not intercept")
        if self.first_draw_advice:
            advice = self.first_draw_advice
        raise SelectionNotApplied(
            f"immiscible: --immiscible_k {self.settings.k} was asked for, but the first training batch of "
            f"{where} (version {version}) was not selected: {why}. Stopping before the first optimizer step so "
            f"that the run does not train on stock noise. {advice}".rstrip())

    # ------------------------------------------------------------------ selection

    def in_validation(self) -> bool:
        """True when a calling frame has ``validation_arg`` bound to False (a validation pass)."""
        if not self.validation_arg:
            return False
        frame = sys._getframe(1)
        for _ in range(self.validation_depth):
            if frame is None:
                return False
            if self.validation_arg in frame.f_code.co_varnames:
                return frame.f_locals.get(self.validation_arg, True) is False
            frame = frame.f_back
        return False

    def select(self, latents: torch.Tensor, point: str, stock: torch.Tensor | None = None) -> torch.Tensor | None:
        """Selected noise for ``latents``, or None for "use stock noise" (off, validation, failure).

        ``stock`` is the host's own draw for this batch, already made: the seed is derived from it
        (:func:`~immiscible_host.ranks.seed_from_draw`), so the host's random streams stay exactly
        stock's at any ``k`` and ``--seed`` still governs the selection (None: the seed is drawn
        from torch's default generator, which consumes it). Under multi-process training the rank
        is mixed in, so that ranks use different pools; with ``--immiscible_scope global`` the
        selection runs over the process group instead (rank 0's seed, one assignment of the global
        batch): a peer's failure is a joint, counted fallback (``select:peer``) and a failed
        collective raises :class:`GroupSelectionFailed`, which ends the run.
        """
        s = self.settings
        if s is None or not s.enabled:
            return None
        if not s.validation and self.in_validation():
            return None
        group = process_group(s.scope)
        try:
            coarse = self.coarse_for(latents.shape)
        except ValueError as exc:   # the option against this latent: a setting to change, not an install problem
            if group is not None:   # the other processes are waiting for this one's part in the selection
                self._collective(lambda: immiscible.abstain(group))
            self.stock("select:coarse", "immiscible: %s; using stock noise for this batch (warned once)", exc,
                       advice="Lower --immiscible_coarse to at most the smallest latent side the dataset produces "
                              "(or set it to 0).")
            return None
        try:
            rs = draw_rank_seed(stock, s.scope)
            noise, info = self._collective(lambda: immiscible.select_noise(
                latents, s.k, seed=rs.seed, mode=s.mode, metric=s.metric, backend=self.backend or s.backend,
                return_info=True, coarse=coarse, group=group))
        except GroupSelectionFailed:
            raise
        except immiscible.PeerSelectionError as exc:   # decided jointly: every process uses stock noise for it
            self.stock("select:peer", "immiscible: %s; using stock noise for this batch on every process "
                       "(warned once)", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - never end a run
            if not bool(torch.isfinite(latents).all()):
                self.stock("select:non-finite-latents", NON_FINITE, point, advice="Fix the data (or the VAE) and run again.")
                return None
            self.stock(f"select:{type(exc).__name__}",
                       "immiscible: selection failed at %s (%s: %s); using stock noise for this batch (warned once)",
                       point, type(exc).__name__, exc)
            return None
        self._record(info, point, rs, latents, noise)
        return noise

    def _collective(self, call):
        """``call()``; a failed collective (the group is unusable) stops this process with one message."""
        try:
            return call()
        except immiscible.CollectiveError as exc:
            msg = GROUP_FAILED.format(exc)
            logger.error(msg)
            raise GroupSelectionFailed(msg) from exc

    def _record(self, info, point, rs, latents=None, noise=None) -> None:
        with self.lock:
            self.calls += 1
            calls = self.calls
        self.window.add(info.reduction_per_sample.detach().float().sum().item(), int(info.index.numel()))
        dump = os.environ.get(self.dump_env) if self.dump_env else None
        if logger.isEnabledFor(logging.DEBUG) or dump:
            row = {"point": point, "call": calls, "rank": rs.rank, "world_size": rs.world_size,
                   "drawn_seed": rs.drawn, "seed": info.seed, "k": info.k, "mode": info.mode, "metric": info.metric,
                   "backend": info.backend, "index": info.index.tolist(), "reduction": info.reduction,
                   "coarse": info.coarse, "coarse_reduction": info.coarse_reduction, "scope": info.scope,
                   "rows": info.rows}
            logger.debug("immiscible selection %s", row)
            if dump:
                try:
                    dump_row(dump, rs.rank, row)
                    if latents is not None:
                        dump_tensors(dump, rs.rank, calls, latents=latents, noise=noise)
                except OSError as exc:
                    self.warn_once("dump", "immiscible: cannot write %s: %s", dump, exc)

    def coarse_for(self, shape) -> int | None:
        """``--immiscible_coarse`` checked against a latent shape, once per shape (raises ``ValueError``
        naming the option)."""
        shape = tuple(shape)
        if shape not in self.coarse_for_shape:
            self.coarse_for_shape[shape] = immiscible.check_coarse(self.settings.coarse, shape,
                                                                   name="immiscible_coarse")
        return self.coarse_for_shape[shape]
