"""This process's sd-scripts run-time state (see :class:`immiscible_host.runtime.Runtime`)."""
from __future__ import annotations

from immiscible_host.runtime import Runtime

#: Set to a folder to make every selection append a JSON line to ``FOLDER/rank{R}.jsonl``.
DUMP_ENV = "IMMISCIBLE_KOHYA_DUMP"

#: sd-scripts' trainers pass ``is_train=False`` down to the noise functions in validation passes.
RUNTIME = Runtime(dump_env=DUMP_ENV, validation_arg="is_train")
