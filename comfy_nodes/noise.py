"""What the ComfyUI nodes compute, free of ComfyUI imports so it is testable with fakes.

Spaces. A ComfyUI ``LATENT`` holds VAE-space samples; the sampler works in *model space*,
``latent_format.process_in(samples)``, where the noise is standard Gaussian. It converts only
latents that are not all zero (an empty latent stays zero). Everything here follows that: the
selection is made against ``process_in(samples)``, and latents the preview returns are mapped back
with ``process_out`` so a VAE Decode shows them.

Noise levels. The preview shows ``x`` noised at ``t`` in [0, 1]:

* flow models (SD3, Flux, Wan, or a MODEL whose sampling is ComfyUI's ``CONST``):
  ``sigma = t`` (no shift), ``x_t = sigma * noise + (1 - sigma) * x``;
* EPS / v models (SD1.5, SDXL): ``x_t = x + sigma * noise`` with ``sigma`` the model's sigma at
  timestep ``t * 999`` (SD's scaled-linear schedule when no MODEL is given: 0 .. 14.6).

Determinism and ``batch_index``. ``comfy.sample.prepare_noise`` gives the sample whose
``batch_index`` is ``i`` the ``i``-th draw of the seed, so a latent split off a batch gets the
noise it had in the batch. Here the batch is selected in one ``immiscible.select_noise`` call with
``sample_ids`` = the batch indices: a knn sample's candidates are keyed by its batch index, which
gives the same property. ``mode="assign"`` couples the whole batch; its pool is seeded from
``derive_seed(seed, *batch_indices)``. Selection runs on the CPU with torch's generators, so a
seed gives the same noise on any machine.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import numpy as np
import torch

import immiscible
from immiscible import derive_seed

from . import viz

logger = logging.getLogger(__name__)

FORMATS = ("auto", "sd15", "sdxl", "sd3", "flux", "wan", "raw")
FLOW_FORMATS = frozenset({"sd3", "flux", "wan", "raw"})
_COMFY_FORMAT_CLASSES = {"sd15": "SD15", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "wan": "Wan21",
                         "raw": "LatentFormat"}
# (scale, shift) of process_in and ComfyUI's (latent_channels, latent_dimensions), used only where
# comfy.latent_formats cannot be imported (unit tests); the integration test compares them with ComfyUI's.
_AFFINE_FALLBACK = {"sd15": (0.18215, 0.0, 4, 2), "sdxl": (0.13025, 0.0, 4, 2), "sd3": (1.5305, 0.0609, 16, 2),
                    "flux": (0.3611, 0.1159, 16, 2), "wan": (1.0, 0.0, 16, 3), "raw": (1.0, 0.0, None, 2)}
#: ComfyUI's seed widget range (``RandomNoise``'s); ``immiscible.check_seed`` accepts all of it.
MAX_SEED = 0xFFFFFFFFFFFFFFFF


class AffineFormat:
    """``process_in(x) = (x - shift) * scale``; a stand-in for ComfyUI's latent formats."""

    latent_rgb_factors = None
    latent_rgb_factors_bias = None

    def __init__(self, scale: float = 1.0, shift: float = 0.0, channels: int | None = None, dimensions: int = 2):
        self.scale_factor, self.shift_factor = scale, shift
        self.latent_channels, self.latent_dimensions = channels, dimensions

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift_factor


@dataclass
class LatentSpace:
    """A latent format (``process_in``/``process_out``, optional RGB factors) and how noise mixes in."""

    name: str
    format: object
    flow: bool
    model_sampling: object = None

    def to_model(self, samples: torch.Tensor) -> torch.Tensor:
        """``process_in``, except that an all-zero latent stays zero (as ComfyUI's sampler does)."""
        if torch.count_nonzero(samples) == 0:
            return samples.clone()
        try:
            return self.format.process_in(samples)
        except RuntimeError as exc:
            raise ValueError(f"latent_format {self.name!r} does not fit a latent of shape "
                             f"{tuple(samples.shape)}: {exc}") from exc

    def to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.process_out(x)

    def sigma(self, t: float) -> float:
        """The sigma that noise level ``t`` in [0, 1] stands for (see the module docstring)."""
        if t <= 0.0:
            return 0.0
        if self.flow and self.model_sampling is None:
            return float(t)
        ms = self.model_sampling
        if ms is not None:
            if t >= 1.0:
                return float(ms.sigma_max)
            return float(ms.percent_to_sigma(1.0 - t))
        return sd_sigma(t)

    def mix(self, x: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        s = self.sigma(t)
        return s * noise + (1.0 - s) * x if self.flow else x + s * noise


def sd_sigma(t: float) -> float:
    """Sigma of SD's scaled-linear schedule (betas 0.00085 .. 0.012, 1000 steps) at timestep ``t * 999``."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    pos = min(max(t, 0.0), 1.0) * 999.0
    lo, w = int(np.floor(pos)), pos - np.floor(pos)
    hi = min(lo + 1, 999)
    return float(((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp())


def auto_format(samples: torch.Tensor) -> str:
    """Guess a format from the shape: 4 channels SD1.5, 16 channels Flux (4-D) or Wan (5-D), else raw."""
    channels = samples.shape[1] if samples.dim() >= 2 else 0
    if samples.dim() == 4 and channels == 4:
        return "sd15"
    if samples.dim() == 4 and channels == 16:
        return "flux"
    if samples.dim() == 5 and channels == 16:
        return "wan"
    return "raw"


def _is_flow_sampling(model_sampling) -> bool:
    return any(cls.__name__ == "CONST" for cls in type(model_sampling).__mro__)


def check_format_name(latent_format) -> str:
    """``latent_format`` checked against :data:`FORMATS` (the node's dropdown)."""
    return immiscible.check_choice("latent_format", latent_format, FORMATS)


def _format_class(name: str):
    """ComfyUI's latent format class for a named format, or None where ComfyUI is not importable."""
    try:
        import comfy.latent_formats as lf
    except ImportError:
        return None
    return getattr(lf, _COMFY_FORMAT_CLASSES[name])


def _expects(name: str) -> tuple[int | None, int]:
    """``(channels, spatial dims)`` a named format expects; channels None for ``raw`` (any)."""
    if name == "raw":
        return None, 2
    cls = _format_class(name)
    if cls is None:
        return _AFFINE_FALLBACK[name][2:]
    return cls.latent_channels, cls.latent_dimensions


def format_expectations() -> str:
    """What each ``latent_format`` choice expects, for messages: ``sd15 4 channels, ..., raw any``."""
    parts = []
    for name in FORMATS[1:]:
        channels, dims = _expects(name)
        parts.append(f"{name} {channels if channels else 'any'}" + (" (5-D video)" if dims == 3 else ""))
    return f"channels per latent_format: {', '.join(parts)}, auto by shape"


def _check_fits(space: "LatentSpace", samples: torch.Tensor, named: bool) -> None:
    """Refuse a latent whose channels (or 5-D video layout) the format does not take, naming both."""
    fmt = space.format
    channels, dims = getattr(fmt, "latent_channels", None), getattr(fmt, "latent_dimensions", 2)
    if named and space.name == "raw":
        return
    shape, got = tuple(samples.shape), samples.shape[1]
    if named:
        what, fix = f"latent_format {space.name!r}", f"{format_expectations()}; choose the one that matches"
    else:
        what, fix = (f"the model's latent format ({space.name})",
                     "the latent does not belong to this model (use its own VAE or empty-latent node)")
    if isinstance(channels, int) and got != channels:
        raise ValueError(f"{what} expects {channels}-channel latents, but the latent has {got} channels "
                         f"(shape {shape}); {fix}")
    if dims == 3 and samples.dim() != 5:
        raise ValueError(f"{what} expects 5-D video latents [B, C, T, H, W], but the latent has shape {shape}; "
                         f"{fix}")


def latent_space(samples: torch.Tensor, model=None, latent_format: str = "auto") -> LatentSpace:
    """The latent space to work in: the MODEL's latent format when given, else the named one.

    A latent the format does not take (channels, or a 4-D latent for a video format) is refused
    here, naming the format and what it expects, before any selection work.
    """
    if model is not None:
        fmt = model.get_model_object("latent_format")
        ms = model.get_model_object("model_sampling")
        space = LatentSpace(type(fmt).__name__, fmt, _is_flow_sampling(ms), ms)
    else:
        check_format_name(latent_format)
        name = auto_format(samples) if latent_format == "auto" else latent_format
        cls = _format_class(name)
        fmt = cls() if cls is not None else AffineFormat(*_AFFINE_FALLBACK[name])
        space = LatentSpace(name, fmt, name in FLOW_FORMATS)
    _check_fits(space, samples, named=model is None)
    return space


# --------------------------------------------------------------------------- noise


def check_settings(seed, k, mode, metric, coarse=0, latent_format="auto") -> tuple[int, int, str, str, int]:
    """The node settings, checked with the core's vocabulary (``coarse`` against a latent later) and
    ``latent_format`` against :data:`FORMATS`, at execute before any work."""
    if immiscible.check_seed(seed) is None:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}]")
    coarse = immiscible.check_int("coarse", coarse, 0, immiscible.COARSE_MAX, " (0 = off; N pools to N x N)")
    check_format_name(latent_format)
    return int(seed), immiscible.check_k(k), immiscible.check_mode(mode), immiscible.check_metric(metric), coarse


def validate_choices(mode=None, metric=None, latent_format=None) -> bool | str:
    """The nodes' queue-time check (V3 ``validate_inputs``) of the dropdown values ComfyUI does not check.

    ComfyUI checks an Int's min/max when a prompt is queued but not a V3 Combo's value, so a bad
    ``mode``/``metric``/``latent_format`` would otherwise fail at run time (for Immiscible Noise,
    inside the sampler, after the checkpoint loaded). None is a linked input, known only at run
    time, where ``check_settings`` checks it. Returns True, or the message naming the input.
    """
    try:
        if mode is not None:
            immiscible.check_mode(mode)
        if metric is not None:
            immiscible.check_metric(metric)
        if latent_format is not None:
            check_format_name(latent_format)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return True


def check_latent(latent) -> torch.Tensor:
    """The ``samples`` of a LATENT dict, checked: a float tensor ``[B, C, H, W]`` or ``[B, C, T, H, W]``."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise TypeError(f"latent must be a ComfyUI LATENT dict with 'samples', got {type(latent).__name__}")
    samples = latent["samples"]
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"latent['samples'] must be a torch.Tensor, got {type(samples).__name__}")
    if samples.dim() < 3 or samples.numel() == 0:
        raise ValueError(f"latent is empty or has no sample dims: shape {tuple(samples.shape)} "
                         "(expected [B, C, H, W] or [B, C, T, H, W] with every dim >= 1)")
    return samples


def batch_indices(latent: dict, batch: int) -> list[int]:
    """``latent["batch_index"]`` (ComfyUI's convention; ``0..B-1`` when absent), checked as sample ids."""
    inds = latent.get("batch_index")
    if inds is None:
        return list(range(batch))
    inds = list(inds)
    if len(inds) != batch:
        raise ValueError(f"latent['batch_index'] has {len(inds)} entries for a batch of {batch} "
                         "(it needs one per sample, as LatentFromBatch sets it)")
    return [immiscible.check_int("latent['batch_index'][i]", _as_int(i), 0, immiscible.SAMPLE_ID_MAX) for i in inds]


def _as_int(value):
    """``value`` as a Python int when it is an integer of any kind (numpy, 0-d tensor); else unchanged."""
    try:
        return operator.index(value)
    except TypeError:
        return value


def comfy_random_noise(samples: torch.Tensor, seed: int, batch_index=None) -> torch.Tensor:
    """What ``comfy.sample.prepare_noise`` returns (``RandomNoise``), without touching global RNG state."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(samples.size(), dtype=samples.dtype, layout=samples.layout, generator=gen, device="cpu")
    unique, inverse = np.unique(batch_index, return_inverse=True)
    draws = {}
    for i in range(int(unique[-1]) + 1):
        n = torch.randn([1] + list(samples.size())[1:], dtype=samples.dtype, layout=samples.layout,
                        generator=gen, device="cpu")
        if i in unique:
            draws[i] = n
    return torch.cat([draws[int(unique[j])] for j in np.asarray(inverse).reshape(-1)], 0)


def select(x: torch.Tensor, k: int, seed: int, mode: str, metric: str, indices: list[int], coarse: int = 0):
    """One selection against model-space ``x`` keyed by batch index; returns ``(noise, SelectionInfo)``.

    ``coarse`` (0 = off) ranks by the ``coarse x coarse`` average-pooled layout; the core refuses a
    latent smaller than that, naming ``coarse`` as the node input is named.
    """
    if mode == "knn":
        return immiscible.select_noise(x, k, seed=seed, mode="knn", metric=metric, backend="torch",
                                       sample_ids=indices, return_info=True, coarse=coarse)
    return immiscible.select_noise(x, k, seed=derive_seed(seed, *indices), mode=mode, metric=metric,
                                   backend="torch", return_info=True, coarse=coarse)


_logged_zero = False


def _log_zero_once():
    global _logged_zero
    if not _logged_zero:
        logger.info("Immiscible Noise: the latent is all zeros (text-to-image), so there is nothing to align "
                    "the noise to; using plain noise, identical to RandomNoise with the same seed.")
        _logged_zero = True


class Noise_Immiscible:
    """A ComfyUI NOISE source: ``.seed`` and ``generate_noise(latent) -> CPU noise in model space``.

    Named after ComfyUI's ``Noise_RandomNoise``; the node that returns it is ``nodes.ImmiscibleNoise``.
    """

    def __init__(self, seed: int, k: int, mode: str = "knn", metric: str = "l2", model=None,
                 latent_format: str = "auto", coarse: int = 0):
        self.seed, self.k, self.mode, self.metric, self.coarse = check_settings(seed, k, mode, metric, coarse,
                                                                                latent_format)
        self.model, self.latent_format = model, latent_format
        self.last_info = None

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        samples = check_latent(input_latent)
        indices = batch_indices(input_latent, samples.shape[0])
        if torch.count_nonzero(samples) == 0:
            _log_zero_once()
            return comfy_random_noise(samples, self.seed, input_latent.get("batch_index"))
        space = latent_space(samples, self.model, self.latent_format)
        x = space.to_model(samples.detach().to("cpu", torch.float32))
        noise, self.last_info = select(x, self.k, self.seed, self.mode, self.metric, indices, self.coarse)
        return noise.to(dtype=samples.dtype, device="cpu")


# --------------------------------------------------------------------------- preview


@dataclass
class PreviewResult:
    sheet: np.ndarray              # uint8 [H, W, 3]
    latents: dict                  # assigned_noise, random_noise, noisy_assigned, noisy_random (VAE space)
    text: str                      # the statistics table as text (the node's STRING output)
    data: viz.PreviewData
    stats: viz.PreviewStats


def check_t(t) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t (noise level) must be a number in [0, 1], got {t!r}")
    return float(t)


def _plain_noise_info(x: torch.Tensor, noise: torch.Tensor, seed: int, mode: str, metric: str,
                      indices: list[int]) -> immiscible.SelectionInfo:
    """The ``SelectionInfo`` of no selection: the noise is the one candidate (an all-zero latent)."""
    flat_x, flat_n = x.flatten(1).float(), noise.flatten(1).float()
    distance = (flat_x - flat_n).square().sum(1)
    cosine = torch.nn.functional.cosine_similarity(flat_x, flat_n, dim=1, eps=1e-30)
    return immiscible.SelectionInfo(index=torch.zeros(x.shape[0], dtype=torch.long), distance=distance,
                                    mean_distance=distance.clone(), cosine=cosine, seed=seed, k=1, mode=mode,
                                    metric=metric, backend="none", distances=distance[:, None],
                                    cosines=cosine[:, None], sample_ids=indices)


def preview(latent: dict, k: int, mode: str, metric: str, seed: int, t: float, model=None,
            latent_format: str = "auto", max_rows: int = 4, coarse: int = 0) -> PreviewResult:
    """Everything the Immiscible Noise Preview node outputs."""
    t = check_t(t)
    samples = check_latent(latent)
    if samples.dim() not in (4, 5):
        raise ValueError(f"the preview shows image latents [B, C, H, W] and video latents [B, C, T, H, W]; "
                         f"latent has shape {tuple(samples.shape)} (Immiscible Noise takes it)")
    seed, k, mode, metric, coarse = check_settings(seed, k, mode, metric, coarse, latent_format)
    indices = batch_indices(latent, samples.shape[0])
    space = latent_space(samples, model, latent_format)
    x = space.to_model(samples.detach().to("cpu", torch.float32))
    random_noise = comfy_random_noise(samples, seed, latent.get("batch_index")).float()
    settings = {"k": k, "mode": mode, "metric": metric, "seed": seed, "format": space.name,
                "mixing": "flow" if space.flow else "eps", "sigma": f"{space.sigma(t):.3g}"}
    if coarse:
        settings["coarse"] = f"{coarse}x{coarse}"
    if torch.count_nonzero(samples) == 0:
        # Nothing to align to: the one "candidate" is the random noise itself.
        _log_zero_once()
        assigned = random_noise.clone()
        info = _plain_noise_info(x, random_noise, seed, mode, metric, indices)
        settings["note"] = "all-zero latent: plain noise"
    else:
        assigned, info = select(x, k, seed, mode, metric, indices, coarse)
    noisy_random, noisy_assigned = space.mix(x, random_noise, t), space.mix(x, assigned, t)
    data = viz.PreviewData(x, random_noise, assigned, noisy_random, noisy_assigned, info, t,
                           settings, getattr(space.format, "latent_rgb_factors", None),
                           getattr(space.format, "latent_rgb_factors_bias", None),
                           1.0 if space.flow else 1.0 / (1.0 + space.sigma(t) ** 2) ** 0.5)
    stats = viz.preview_stats(data)
    dtype = samples.dtype

    def out(z):
        return {"samples": space.to_vae(z).to(dtype)}

    latents = {"assigned_noise": out(assigned), "random_noise": out(random_noise),
               "noisy_assigned": out(noisy_assigned), "noisy_random": out(noisy_random)}
    return PreviewResult(viz.render_preview_sheet(data, stats, max_rows=max_rows), latents,
                         viz.format_stats(data, stats), data, stats)
