"""The core's public vocabulary: the choices, the ranges and the argument checks.

Every adapter (sd-scripts, musubi-tuner, ComfyUI) imports its option choices and ranges from
here (re-exported as ``immiscible.MODES``, ``immiscible.K_MAX``, ``immiscible.check_k``, ...),
so a range changes in one place. Bad user input raises ``ValueError``/``TypeError`` that names
the argument and its allowed range; ``assert`` is kept for internal invariants only.
"""
from __future__ import annotations

import math
import numbers

import torch

MODES = ("knn", "assign")
METRICS = ("l2", "cosine")
BACKENDS = ("auto", "torch", "triton")
#: Where an assignment's batch comes from: this process's batch, or every process's (``select_noise(group=...)``).
SCOPES = ("rank", "global")

#: Smallest ``k``: one candidate, that is plain Gaussian noise (selection off).
K_MIN = 1
#: Largest accepted ``k``. Beyond this the selection costs minutes per step and the
#: effect has long saturated (the reduction grows like sqrt(2 log k)).
K_MAX = 65536
#: Largest accepted ``coarse`` pooled size, for inputs that need a static bound (a command line,
#: a node). The real bound is the latent's shorter spatial side, checked when latents arrive.
COARSE_MAX = 1024
#: Largest sample id (``sample_ids``): the Philox counter holds it in one 32-bit word.
SAMPLE_ID_MAX = 2**32 - 1
#: Largest accepted assignment cost matrix, ``B * (k * B)`` entries (1 GiB in float64).
MAX_ASSIGN_COST_ENTRIES = 2**27
#: Largest accepted elements per sample (the Philox counter holds it in 32 bits, 4 at a time).
MAX_ELEMENTS_PER_SAMPLE = 2**33
#: The dtypes ``latents`` may have. float8 (no reductions on the CPU), complex, integer and bool
#: tensors are refused up front, naming these.
LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Largest accepted ``|value|`` in ``latents``: 2**47, about 1.4e14. Selection scores in fp32, and at
#: this magnitude ``|x|^2`` of a sample of ``MAX_ELEMENTS_PER_SAMPLE`` (2**33) elements is 2**127,
#: still finite in fp32 (whose largest value is just under 2**128), so every score and statistic
#: stays finite; a sample's nearest candidate is found exactly up to it (``scoring.LARGE_NORM_SQ``).
#: Beyond it (|x|^2 overflowing fp32 from about 1.8e19 / sqrt(D) on) every sample got candidate 0
#: and NaN statistics. Latents of any VAE are many orders of magnitude below it.
LATENT_ABS_MAX = 2.0**47
#: Smallest accepted largest ``|value|`` of a sample that is not all zeros: 2**-63, about 1.08e-19.
#: From it on a sample's ``|x|^2`` is a normal fp32 (at least 2**-126), so its cosines are exact.
#: Below it ``|x|^2`` underflowed and "cosines" of 2e6 were reported (at 1e-25), and float64 latents
#: under fp32's range became zeros, so cosine selection gave every such sample candidate 0. An
#: all-zero sample is accepted: each candidate is exactly as near (the lowest index wins).
LATENT_ABS_MIN = 2.0**-63


def check_int(name: str, value, lo: int, hi: int, note: str = "") -> int:
    """``value`` as an int in ``[lo, hi]``; ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [{lo}, {hi}]{note}, got {value!r} ({type(value).__name__})")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}]{note}, got {value}")
    return int(value)


def check_k(k, name: str = "k") -> int:
    """``k`` in ``[K_MIN, K_MAX]``; ``name`` is how the caller's user spells the option."""
    return check_int(name, k, K_MIN, K_MAX, " (1 = plain Gaussian noise, selection off)")


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_mode(mode, name: str = "mode") -> str:
    return check_choice(name, mode, MODES)


def check_metric(metric, name: str = "metric") -> str:
    return check_choice(name, metric, METRICS)


def check_backend(backend, name: str = "backend") -> str:
    return check_choice(name, backend, BACKENDS)


def check_scope(scope, name: str = "scope") -> str:
    return check_choice(name, scope, SCOPES)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


def check_seed(seed) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def check_sample_ids(sample_ids, batch: int) -> list[int] | None:
    """``None`` (ids = batch positions) or ``batch`` integers in ``[0, SAMPLE_ID_MAX]``."""
    if sample_ids is None:
        return None
    if isinstance(sample_ids, torch.Tensor):
        if (sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dim() != 1
                or sample_ids.layout != torch.strided):
            raise TypeError(f"sample_ids must be a dense 1-D integer tensor or a sequence of ints, "
                            f"got {sample_ids.dtype} of shape {tuple(sample_ids.shape)} and layout {sample_ids.layout}")
        if sample_ids.device.type == "meta":
            raise ValueError("sample_ids are on the meta device, which holds no values; pass a tensor with values "
                             "or a sequence of ints")
        sample_ids = sample_ids.tolist()
    try:
        ids = list(sample_ids)
    except TypeError:
        raise TypeError(f"sample_ids must be a sequence of {batch} integers, got {type(sample_ids).__name__}") from None
    if len(ids) != batch:
        raise ValueError(f"sample_ids must hold one id per sample ({batch}), got {len(ids)}")
    return [check_int("sample_ids[i]", i, 0, SAMPLE_ID_MAX) for i in ids]


def check_tensor(latents, name: str = "latents") -> torch.Tensor:
    """A dense tensor of ``LATENT_DTYPES`` with values (not on the meta device); its shape is not checked."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, ...], got {type(latents).__name__}")
    if latents.is_nested:
        raise TypeError(f"{name} must be a dense tensor (layout torch.strided), got a nested tensor")
    if latents.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor (layout torch.strided), got layout {latents.layout} "
                        f"(.to_dense() converts it)")
    if latents.dtype not in LATENT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {latents.dtype}")
    if latents.device.type == "meta":
        raise ValueError(f"{name} are on the meta device, which holds no values; selection needs a tensor with "
                         f"values (cpu, cuda, ...)")
    return latents


def check_latents(latents) -> torch.Tensor:
    """``latents [B, ...]`` that selection can score: see ``check_tensor``, at least one sample of at
    least one element, at most ``MAX_ELEMENTS_PER_SAMPLE`` per sample, finite, every ``|value|`` at
    most ``LATENT_ABS_MAX``, and each sample all zeros or with a ``|value|`` of at least ``LATENT_ABS_MIN``."""
    check_tensor(latents)
    if latents.dim() < 2:
        raise ValueError(f"latents must have at least 2 dims [B, ...], got shape {tuple(latents.shape)}")
    if latents.shape[0] < 1:
        raise ValueError(f"latents must hold at least one sample (batch size >= 1), got shape {tuple(latents.shape)}")
    numel = math.prod(latents.shape[1:])
    if numel < 1:
        raise ValueError(f"latents must have at least one element per sample, got shape {tuple(latents.shape)}")
    if numel > MAX_ELEMENTS_PER_SAMPLE:
        raise ValueError(f"latents may have at most {MAX_ELEMENTS_PER_SAMPLE} elements per sample, got {numel}")
    # Each sample's min and max: NaN propagates through both, an Inf is the min or the max, and so is
    # the largest magnitude. amin + amax over the sample dimensions (no copy for any strides) take
    # 1-4 ms at [16, 262144] on one CPU core, about what one global aminmax takes; aminmax(dim=1)
    # took 20 ms and an fp64 sum 23 ms.
    data, dims = latents.detach(), tuple(range(1, latents.dim()))
    lo, hi = torch.stack([data.amin(dims), data.amax(dims)]).double().tolist()
    if not all(math.isfinite(v) for v in lo + hi):
        raise ValueError("latents contain NaN or Inf; immiscible selection needs finite latents")
    largest = [max(-a, b) for a, b in zip(lo, hi)]
    biggest = max(largest)
    if biggest > LATENT_ABS_MAX:
        raise ValueError(f"latents must have every |value| <= {LATENT_ABS_MAX:g} (immiscible.LATENT_ABS_MAX = 2**47, "
                         f"the largest at which fp32 scoring holds |x|^2), got a value of magnitude {biggest:.9g}")
    for b, top in enumerate(largest):
        if 0.0 < top < LATENT_ABS_MIN:
            raise ValueError(f"latents[{b}] has no |value| above {top:.9g}: a sample must be all zeros or have a value of "
                             f"magnitude at least {LATENT_ABS_MIN:.5g} (immiscible.LATENT_ABS_MIN = 2**-63, the smallest "
                             f"at which fp32 scoring holds |x|^2)")
    return latents


def check_assign_size(batch: int, k: int) -> None:
    entries = batch * batch * k
    if entries > MAX_ASSIGN_COST_ENTRIES:
        raise ValueError(
            f"mode='assign' with batch size {batch} and k={k} needs a {batch}x{batch * k} cost matrix; "
            f"batch**2 * k must be at most {MAX_ASSIGN_COST_ENTRIES} (use a smaller k or mode='knn')")


def check_coarse(coarse, shape, name: str = "coarse") -> int | None:
    """``None`` (off) or the pooled size ``N`` for latents of ``shape`` ``[B, ..., H, W]``.

    ``None`` and ``0`` are off (0 is how a command line or a node says it). ``N`` must be in
    ``[1, min(H, W)]``: pooling to ``N x N`` over the last two (spatial) dimensions needs two of
    them, each at least ``N`` long.
    """
    if coarse is None:
        return None
    if isinstance(coarse, bool) or not isinstance(coarse, numbers.Integral):
        raise TypeError(f"{name} must be 0 (off) or an integer N >= 1 (pool to N x N), "
                        f"got {coarse!r} ({type(coarse).__name__})")
    coarse = int(coarse)
    if coarse == 0:
        return None
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(isinstance(n, numbers.Integral) for n in shape):
        raise TypeError(f"shape must be the latents' shape, a sequence of ints [B, ..., H, W], got {shape!r}")
    if not 0 < coarse <= COARSE_MAX:
        raise ValueError(f"{name} must be 0 (off) or an integer N in [1, {COARSE_MAX}] (pool to N x N), got {coarse}")
    if len(shape) < 3:
        raise ValueError(f"{name}={coarse} needs latents with two spatial dimensions, shape [B, ..., H, W]; "
                         f"got shape {tuple(shape)}")
    side = min(shape[-2], shape[-1])
    if coarse > side:
        raise ValueError(f"{name} must be in [0, {side}] for latents of shape {tuple(shape)} "
                         f"(0 = off; N x N pooling of an {shape[-2]} x {shape[-1]} latent), got {coarse}")
    return coarse
