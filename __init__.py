"""ComfyUI entry point of the Immiscible Diffusion Noise pack.

ComfyUI imports this folder as a custom-node package and calls ``comfy_entrypoint()``. Importing
this module is cheap: torch, ComfyUI and the nodes load only when ComfyUI calls the entry point.
"""
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))


def _ensure_core_importable() -> None:
    """Make ``import immiscible`` resolve (to this pack's copy unless one is installed)."""
    import importlib.util

    if importlib.util.find_spec("immiscible") is None and _PACK_DIR not in sys.path:
        sys.path.append(_PACK_DIR)


async def comfy_entrypoint():
    _ensure_core_importable()
    if __package__:
        from .comfy_nodes.nodes import comfy_entrypoint as entrypoint
    else:  # loaded as a plain module
        if _PACK_DIR not in sys.path:
            sys.path.append(_PACK_DIR)
        from comfy_nodes.nodes import comfy_entrypoint as entrypoint
    return await entrypoint()
