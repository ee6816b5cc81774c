"""Run an sd-scripts training script with the immiscible patches, no installed start-up hook needed.

    python -m kohya_patch.run PATH/TO/train_network.py ARGS...
    accelerate launch -m kohya_patch.run PATH/TO/train_network.py ARGS...
"""
from __future__ import annotations

import sys

from immiscible_host.run import run_script

from .host import ADAPTER


def main(argv: list[str] | None = None) -> int:
    return run_script(argv, prog="kohya_patch.run", doc=__doc__, install_hook=ADAPTER.hook.install)


if __name__ == "__main__":
    sys.exit(main())
