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
import runpy
import sys

from . import hook, preflight

USAGE = "usage: python -m musubi_patch.run SCRIPT.py [ARGS...]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f"musubi_patch.run: no such script: {argv[0]}\n{USAGE}", file=sys.stderr)
        return 2
    hook.install()
    sys.argv = [script, *argv[1:]]
    folder, name = os.path.split(script)
    if os.path.basename(folder) == "musubi_tuner" and os.path.isfile(os.path.join(folder, "__init__.py")):
        sys.path.insert(0, os.path.dirname(folder))          # src/, as an installed musubi_tuner would be
        preflight.SCRIPT = name
        module = importlib.import_module("musubi_tuner." + name[:-3])
        module.main()
        return 0
    sys.path.insert(0, folder)  # what `python SCRIPT.py` does and runpy does not
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
