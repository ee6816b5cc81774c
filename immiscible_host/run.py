"""``python -m <adapter>.run SCRIPT.py ARGS...``: run a host's training script with the adapter's
patches and no installed start-up hook. Each adapter's ``run`` module calls :func:`run_script`."""
from __future__ import annotations

import os
import runpy
import sys


def run_as_main(script: str) -> None:
    """What ``python SCRIPT.py`` does: the script's folder first on ``sys.path`` (runpy does not)."""
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


def run_script(argv, *, prog: str, doc: str, install_hook, run=run_as_main) -> int:
    """Check ``argv`` (``[SCRIPT.py, ARGS...]``), install the hook, set ``sys.argv``, ``run(script)``."""
    usage = f"usage: python -m {prog} SCRIPT.py [ARGS...]"
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage + "\n\n" + doc.strip(), file=sys.stderr)
        return 0 if argv else 2
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f"{prog}: no such script: {argv[0]}\n{usage}", file=sys.stderr)
        return 2
    install_hook()
    sys.argv = [script, *argv[1:]]
    run(script)
    return 0
