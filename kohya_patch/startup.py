"""Imported by the ``immiscible_kohya_startup.pth`` line at interpreter start-up, which ignores any
error (venvs installed by every version of this pack point here, so the module keeps its name).
It stays cheap: it only installs the sd-scripts adapter's import hook (see benchmarks/hook_startup.py)."""
from .host import ADAPTER

ADAPTER.hook.install()
