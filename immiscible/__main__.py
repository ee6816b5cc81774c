"""``python -m immiscible demo|effect``: a thin entry to the A/B lab, which lives in ``immiscible_lab``.

The selector itself never imports the lab; only this command-line entry does, when it runs.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    try:
        from immiscible_lab.__main__ import main as lab_main
    except ImportError as exc:  # pragma: no cover - only without the lab's extras
        sys.stderr.write(f"python -m immiscible needs the lab: pip install 'immiscible-diffusion[demo]' ({exc})\n")
        return 2
    return lab_main(argv)


if __name__ == "__main__":
    sys.exit(main())
