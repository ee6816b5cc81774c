"""What every training-program adapter shares (sd-scripts today, musubi-tuner next).

An adapter describes its host program in one table of :class:`~immiscible_host.points.PatchPoint`
rows and gets from here: the import hook that patches the host's modules as they load
(:mod:`.hook`), the module patcher driven by the table (:mod:`.patching`), the
``--immiscible_*`` options, their checks and the ``ss_immiscible_*`` metadata (:mod:`.options`),
start-up checks (:mod:`.startup`), run-time selection with fallback (:mod:`.runtime`), rank-aware
seeding (:mod:`.ranks`), the ``torch.randn_like`` interception (:mod:`.randn_like`) and the
reduction telemetry for accelerate trackers (:mod:`.telemetry`).

Layering: adapters import this package, this package imports only the core (:mod:`immiscible`),
torch and the standard library; never an adapter, sd-scripts' ``library`` or ``comfy``.
Importing the package, :mod:`.points` or :mod:`.hook` imports nothing heavy (no torch).
"""
