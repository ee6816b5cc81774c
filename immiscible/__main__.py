"""``python -m immiscible``: the selector has no command line; it names the lab's.

The A/B demo and the effect table live in ``immiscible_lab`` (``python -m immiscible_lab demo|effect``).
This module does not import the lab: the core never does.
"""
from __future__ import annotations

import sys

MESSAGE = ("immiscible is a library (immiscible.select_noise); it has no commands. The A/B demo and the "
           "effect table moved to the lab: python -m immiscible_lab demo | python -m immiscible_lab effect "
           "(needs pip install 'immiscible-diffusion[demo]')\n")


def main(argv=None) -> int:
    sys.stderr.write(MESSAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
