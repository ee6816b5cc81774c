"""This process's musubi-tuner run-time state (see :class:`immiscible_host.runtime.Runtime`)."""
from __future__ import annotations

from immiscible_host.runtime import Runtime

#: Set to a folder to make every selection append a JSON line to ``FOLDER/rank{R}.jsonl``.
DUMP_ENV = "IMMISCIBLE_MUSUBI_DUMP"

#: musubi-tuner has no validation loop, so every draw the pack sees is a training draw.
RUNTIME = Runtime(dump_env=DUMP_ENV, validation_arg=None)
