"""Run an sd-scripts training script with the immiscible patches, no installed start-up hook needed.

    python -m kohya_patch.run PATH/TO/train_network.py ARGS...
    accelerate launch -m kohya_patch.run PATH/TO/train_network.py ARGS...
"""
from __future__ import annotations

import os
import runpy
import sys

from . import hook

USAGE = "usage: python -m kohya_patch.run SCRIPT.py [ARGS...]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.strip(), file=sys.stderr)
        return 0 if argv else 2
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f"kohya_patch.run: no such script: {argv[0]}\n{USAGE}", file=sys.stderr)
        return 2
    hook.install()
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))  # what `python SCRIPT.py` does and runpy does not
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
