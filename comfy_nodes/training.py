"""What Train LoRA (Immiscible) adds to ComfyUI's own Train LoRA, free of ComfyUI imports (testable with fakes).

ComfyUI's ``TrainLoraNode.train`` (``comfy_extras/nodes_train.py``) runs a ``TrainSampler`` whose
``sample`` draws each micro-step ``i``'s noise as
``comfy_extras.nodes_custom_sampler.Noise_RandomNoise(seed + i * 1000).generate_noise({"samples": batch})``.
That draw goes through ``comfy.sample.prepare_noise``, which reseeds torch's **global** generator
and advances it; the step's sigmas and the next step's batch (``randperm``) then come from it.

For one call of the node, :func:`selected_training_noise` makes ``TrainSampler`` a subclass whose
``sample`` runs the stock loop with ``Noise_RandomNoise`` standing for :class:`SelectedDraw`: the
stock draw is made first, exactly as stock makes it (so the global generator ends each step where
stock leaves it, and batches, sigmas and LoRA initialisation are stock's), then the selection is
seeded from that draw (:func:`immiscible_host.ranks.seed_from_draw`, common random numbers) and
draws its candidates from generators of its own. ``k = 1`` returns the stock draw itself. Both
swaps are undone on every exit path, so a stock Train LoRA queued afterwards is stock.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers

import torch

import immiscible
from immiscible_host.options import Settings, with_metadata
from immiscible_host.ranks import seed_from_draw

from .train_support import TESTED

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- queue-time checks


def check_settings(k, mode, metric, coarse) -> Settings:
    """The node's own inputs as :class:`Settings` (``TypeError``/``ValueError`` naming the input and its range)."""
    return Settings(k=immiscible.check_int("k", k, immiscible.K_MIN, immiscible.K_MAX, " (1 = off: stock noise)"),
                    mode=immiscible.check_mode(mode), metric=immiscible.check_metric(metric),
                    coarse=immiscible.check_int("coarse", coarse, 0, immiscible.COARSE_MAX,
                                                " (0 = off; N pools to N x N)"))


def spec_problems(input_types: dict, values: dict) -> list[str]:
    """What is wrong with the widget ``values`` against a V1 ``INPUT_TYPES()`` dict (ComfyUI skips its own
    range and list checks for a node that validates with ``**kwargs``). Links and absent values (None) pass."""
    problems = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            value = values.get(name)
            if value is None:
                continue
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, (list, tuple)):
                if value not in kind:
                    shown = list(kind) if len(kind) <= 20 else f"one of {len(kind)} choices"
                    problems.append(f"{name} must be one of {shown}, got {value!r}")
            elif kind in ("INT", "FLOAT") and isinstance(value, numbers.Real) and not isinstance(value, bool):
                lo, hi = opts.get("min", -math.inf), opts.get("max", math.inf)
                if not lo <= value <= hi:
                    problems.append(f"{name} must be in [{lo}, {hi}], got {value}")
    return problems


# --------------------------------------------------------------------------- one training call


class SelectionNotApplied(RuntimeError):
    """Selection was asked for, but the training's first draw did not go through it."""


class TrainedLoRA(dict):
    """A ``LORA_MODEL`` (a plain dict of tensors, so stock nodes take it) that carries the
    ``ss_immiscible_*`` metadata its training wrote (``metadata``)."""

    def __init__(self, tensors, metadata=None):
        super().__init__(tensors)
        self.metadata = dict(metadata or {})


class TrainingRun:
    """One training call's selection: its settings, a statistic per micro-step, the stock steps.

    ``stats[i]`` is micro-step ``i``'s mean reduction ``1 - d(chosen) / mean d(candidates)``, or
    under ``coarse`` the mean pooled cosine(chosen noise, latent); 0.0 at a step that fell back to
    stock noise (listed in ``stock_steps``). At ``k = 1`` nothing is selected and it is the mean
    cosine(stock noise, latent), so a k = 1 run plots beside a k > 1 run (Plot Loss Graph cannot
    draw a constant series).
    """

    def __init__(self, settings: Settings, where: str = "Train LoRA (Immiscible)"):
        self.settings, self.where = settings, where
        self.stats: list[float] = []
        self.stock_steps: list[int] = []
        self.selected = 0
        self.warned = False

    @property
    def statistic(self) -> str:
        if not self.settings.enabled:
            return "cosine (k=1: stock noise)"
        return "pooled cosine" if self.settings.coarse else "reduction"

    def select(self, latents: torch.Tensor, stock: torch.Tensor) -> torch.Tensor:
        """The noise for this micro-step: ``stock`` (the step's stock draw, already made) at ``k = 1``,
        else the selection for ``latents`` seeded from ``stock``. A failure at the first step raises
        :class:`SelectionNotApplied` (nothing has trained yet); later it warns once and uses ``stock``."""
        step = len(self.stats)
        s = self.settings
        if not s.enabled:
            flat = lambda t: t.detach().reshape(t.shape[0], -1).float()  # noqa: E731
            cosine = torch.nn.functional.cosine_similarity(flat(stock), flat(latents).to(stock.device))
            self.stats.append(float(cosine.mean()))
            return stock
        try:
            noise, info = immiscible.select_noise(latents, s.k, seed=seed_from_draw(stock), mode=s.mode,
                                                  metric=s.metric, backend=s.backend, return_info=True,
                                                  coarse=s.coarse or None)
        except Exception as exc:  # noqa: BLE001 - after the first step, never end a training run
            if step == 0:
                raise SelectionNotApplied(
                    f"{self.where}: k={s.k} was asked for, but the first training step's noise could not be "
                    f"selected ({type(exc).__name__}: {exc}); stopping before any training so that it does not "
                    f"train on stock noise") from exc
            if not self.warned:
                self.warned = True
                logger.warning("%s: selection failed at micro-step %d (%s: %s); that step uses stock noise "
                               "(warned once; counted in the summary and the selection output)",
                               self.where, step, type(exc).__name__, exc)
            self.stock_steps.append(step)
            self.stats.append(0.0)
            return stock
        self.selected += 1
        stat = info.coarse_cosine.float().mean() if s.coarse else info.reduction_per_sample.float().mean()
        self.stats.append(float(stat))
        return noise.to(stock.dtype)

    def check_first_step(self) -> None:
        """Before the first backward: refuse when selection was asked for and no draw went through it."""
        if self.settings.enabled and self.selected == 0 and not self.stock_steps:
            raise SelectionNotApplied(
                f"{self.where}: k={self.settings.k} was asked for, but the first training step's noise did not go "
                f"through the selection (this ComfyUI's TrainSampler draws its noise another way); stopping before "
                f"any training so that it does not train on stock noise (tested: {TESTED})")

    def selection_map(self) -> dict:
        """The statistic per micro-step in a ``LOSS_MAP`` (Plot Loss Graph draws ``"loss"``)."""
        return {"loss": list(self.stats), "statistic": self.statistic, "stock_steps": list(self.stock_steps)}

    def metadata(self) -> dict[str, str]:
        """The ``ss_immiscible_*`` keys the sd-scripts adapter writes (none at ``k = 1``)."""
        return with_metadata({}, self.settings, stock_batches=len(self.stock_steps))

    def summary(self, steps: int, grad_accumulation_steps: int, version: str = "") -> str:
        s = self.settings
        head = (f"Train LoRA (Immiscible){' on ComfyUI ' + version if version else ''}: {steps} steps x "
                f"{grad_accumulation_steps} accumulation = {len(self.stats)} micro-steps; k={s.k}, mode={s.mode}, "
                f"metric={s.metric}, coarse={s.coarse or 'off'}")
        if not s.enabled:
            return head + "; k=1: stock noise (bit-identical to Train LoRA)"
        values = [v for i, v in enumerate(self.stats) if i not in set(self.stock_steps)]
        mean = sum(values) / len(values) if values else float("nan")
        shown = f"{mean:.4f}" if s.coarse else f"{mean:.3%}"
        return (head + f"; selected {self.selected} of {len(self.stats)} micro-steps, mean {self.statistic} {shown}; "
                f"stock steps {len(self.stock_steps)}" + (f" (at {self.stock_steps})" if self.stock_steps else ""))


class SelectedDraw:
    """Stands for ``Noise_RandomNoise(seed)`` inside one training call: stock's draw, then the selection."""

    def __init__(self, seed, stock_noise_cls, run: TrainingRun):
        self.stock = stock_noise_cls(seed)
        self.seed = self.stock.seed
        self.run = run

    def generate_noise(self, input_latent):
        stock = self.stock.generate_noise(input_latent)
        return self.run.select(input_latent["samples"], stock)


@contextlib.contextmanager
def selected_training_noise(train_module, custom_sampler_module, run: TrainingRun):
    """Within: ``train_module.TrainSampler`` draws ``run``'s selected noise; restored on every exit.

    Only ``TrainSampler.sample`` sees :class:`SelectedDraw` (``Noise_RandomNoise`` is swapped for that
    call alone, so the node's dummy noise and every other node keep the stock class), and its loss
    function first checks that the step's noise went through the selection.
    """
    stock_sampler = train_module.TrainSampler
    stock_noise = custom_sampler_module.Noise_RandomNoise

    def selected_noise(seed):
        return SelectedDraw(seed, stock_noise, run)

    def checked_loss(loss_fn):
        def loss(*args, **kwargs):
            run.check_first_step()
            return loss_fn(*args, **kwargs)
        return loss

    class ImmiscibleTrainSampler(stock_sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_fn = checked_loss(self.loss_fn)

        def sample(self, *args, **kwargs):
            custom_sampler_module.Noise_RandomNoise = selected_noise
            try:
                return super().sample(*args, **kwargs)
            finally:
                custom_sampler_module.Noise_RandomNoise = stock_noise

    train_module.TrainSampler = ImmiscibleTrainSampler
    try:
        yield run
    finally:
        train_module.TrainSampler = stock_sampler
