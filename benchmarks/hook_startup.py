"""What the sd-scripts / musubi-tuner start-up hook costs every interpreter of the trainer's venv.

The installed ``.pth`` line imports ``kohya_patch.startup`` (or ``musubi_patch.startup``) in every
Python process of that environment, so its import time is paid by programs that never train.
This times that import with ``python -X importtime`` for two pack checkouts (e.g. a previous
commit and this one), interleaved pair by pair so both see the same machine load, and reports the
median cumulative import time of the startup module and the ratio new / old. It also checks that
the import pulls in no torch (the hook must stay cheap until a host module is imported).

    python benchmarks/hook_startup.py --old /tmp/old_tree --new . [--runs 40] [--json benchmarks/hook_startup.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

MODULES = ("kohya_patch.startup", "musubi_patch.startup")


def import_time_us(pack: Path, module: str) -> tuple[int, bool]:
    """Cumulative ``-X importtime`` microseconds of ``module`` from ``pack``; whether torch got imported."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(pack), "PATH": "/usr/bin:/bin"}, cwd="/", check=True)
    line = next(ln for ln in res.stderr.splitlines() if ln.rstrip().endswith("| " + module))
    return int(line.split("|")[1]), res.stdout.strip() == "True"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="pack checkout to compare against")
    p.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent, help="this pack (default)")
    p.add_argument("--runs", type=int, default=40, help="interleaved pairs per module (default 40)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error("--runs must be at least 3")
    rows = {}
    for module in MODULES:
        old, new, torch_seen = [], [], False
        for _ in tqdm(range(args.runs), desc=module, leave=False):
            t, seen = import_time_us(args.old, module)
            old.append(t)
            t, seen_new = import_time_us(args.new, module)
            new.append(t)
            torch_seen |= seen_new
        rows[module] = {"old_median_us": statistics.median(old), "new_median_us": statistics.median(new),
                        "ratio": statistics.median(new) / statistics.median(old), "new_imports_torch": torch_seen,
                        "runs": args.runs}
    print(f"{'module':<24} {'old ms':>8} {'new ms':>8} {'new/old':>8} {'torch?':>7}")
    for module, r in rows.items():
        print(f"{module:<24} {r['old_median_us'] / 1000:>8.2f} {r['new_median_us'] / 1000:>8.2f} "
              f"{r['ratio']:>8.3f} {str(r['new_imports_torch']):>7}")
    if args.json:
        args.json.write_text(json.dumps({"python": sys.version.split()[0], "machine": platform.machine(),
                                         "old": str(args.old), "new": str(args.new), "modules": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
