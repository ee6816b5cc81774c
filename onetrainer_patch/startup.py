"""Imported by the ``immiscible_onetrainer_startup.pth`` line at interpreter start-up, which ignores
any error. It stays cheap: it only installs the OneTrainer adapter's import hook."""
from .host import ADAPTER

ADAPTER.hook.install()
