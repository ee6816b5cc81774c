"""Run a musubi-tuner training script with the immiscible patches, no installed start-up hook needed.

    python -m musubi_patch.run PATH/TO/musubi-tuner/wan_train_network.py ARGS...
    accelerate launch -m musubi_patch.run PATH/TO/musubi-tuner/src/musubi_tuner/hv_train.py ARGS...

A script inside the ``musubi_tuner`` package (``src/musubi_tuner/X.py``) is imported as
``musubi_tuner.X`` and its ``main()`` called, exactly what the repository-root wrappers do, so the
patches reach scripts with their own parser (``hv_train.py``) too. Any other script runs as ``__main__``.
"""
from __future__ import annotations

import importlib
import os
import sys

from immiscible_host.run import run_as_main, run_script

from .host import ADAPTER


def _run(script: str) -> None:
    folder, name = os.path.split(script)
    if os.path.basename(folder) == "musubi_tuner" and os.path.isfile(os.path.join(folder, "__init__.py")):
        sys.path.insert(0, os.path.dirname(folder))          # src/, as an installed musubi_tuner would be
        ADAPTER.script = name
        importlib.import_module("musubi_tuner." + name[:-3]).main()   # a host module, as its wrappers do
    else:
        run_as_main(script)


def main(argv: list[str] | None = None) -> int:
    return run_script(argv, prog="musubi_patch.run", doc=__doc__, install_hook=ADAPTER.hook.install, run=_run)


if __name__ == "__main__":
    sys.exit(main())
