"""Whether a ComfyUI checkout trains the way Train LoRA (Immiscible) expects (standard library only).

Read as text, so ``install.py --check --comfyui PATH`` answers without importing torch or ComfyUI,
and the node answers the same at queue time from the loaded module's source.
"""
from __future__ import annotations

import re
from pathlib import Path

#: The ComfyUI this node was written and tested against.
TESTED = "ComfyUI v0.3.64 (a125cd84)"
#: What the node relies on in ``comfy_extras/nodes_train.py``, each with what it is for.
EXPECTED = (
    ("class TrainLoraNode", "the Train LoRA node (TrainLoraNode)"),
    ("class TrainSampler", "the TrainSampler its training loop runs in"),
    ("comfy_extras.nodes_custom_sampler.Noise_RandomNoise(",
     "TrainSampler drawing each step's noise with "
     "comfy_extras.nodes_custom_sampler.Noise_RandomNoise(seed + i * 1000)"),
    (".generate_noise(", "that noise made by generate_noise({'samples': batch_latent})"),
)


def training_support(source: str | None, version: str) -> str | None:
    """None when ComfyUI's ``nodes_train.py`` (its text ``source``; None: absent) trains the way this
    node expects, else why the node cannot select its noise, naming the ComfyUI ``version``."""
    if source is None:
        return (f"ComfyUI {version} has no comfy_extras/nodes_train.py (its Train LoRA node), so there is no "
                f"training to select noise for; update ComfyUI (tested: {TESTED})")
    missing = [what for needle, what in EXPECTED if needle not in source]
    if missing:
        return (f"ComfyUI {version}: comfy_extras/nodes_train.py no longer has {'; '.join(missing)}, so Train LoRA "
                f"(Immiscible) cannot select that noise and refuses to train on stock noise instead "
                f"(tested: {TESTED}; use the stock Train LoRA, or a pack version that supports this ComfyUI)")
    return None


def checkout_version(comfyui: Path) -> str:
    """``v0.3.64`` from ``comfyui_version.py`` of a checkout (``(version unknown)`` without it)."""
    try:
        found = re.search(r'__version__\s*=\s*["\']([^"\']+)', (comfyui / "comfyui_version.py").read_text())
    except OSError:
        found = None
    return f"v{found.group(1)}" if found else "(version unknown)"


def checkout_support(comfyui: Path) -> str | None:
    """:func:`training_support` for a checkout on disk."""
    try:
        source = (comfyui / "comfy_extras" / "nodes_train.py").read_text(encoding="utf-8")
    except OSError:
        source = None
    return training_support(source, checkout_version(comfyui))
