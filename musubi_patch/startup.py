"""Imported by the ``immiscible_musubi_startup.pth`` line at interpreter start-up.

It must never raise and must stay cheap: it only installs :mod:`musubi_patch.hook`.
"""
try:
    from .hook import install as _install

    _install()
except Exception:  # noqa: BLE001 - an unrelated program must never see this
    pass
