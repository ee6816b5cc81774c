"""Imported by the ``immiscible_kohya_startup.pth`` line at interpreter start-up (venvs installed by
every version of this pack point here, so this module keeps its name).

It must never raise and must stay cheap: it only installs the sd-scripts adapter's import hook.
"""
try:
    from .host import ADAPTER as _ADAPTER

    _ADAPTER.hook.install()
except Exception:  # noqa: BLE001 - an unrelated program must never see this
    pass
