#!/usr/bin/env python3
"""Install the immiscible pack into an sd-scripts environment and/or a ComfyUI installation.

    python install.py --sd-scripts PATH [--python VENV_PYTHON]   # kohya-ss sd-scripts
    python install.py --comfyui PATH                             # ComfyUI custom node
    python install.py --musubi-tuner PATH [--python VENV_PYTHON] # kohya-ss musubi-tuner (--check/--uninstall too)
    python install.py --onetrainer PATH [--python VENV_PYTHON]   # Nerogar OneTrainer (--check/--uninstall too)
    python install.py --check [--sd-scripts PATH] [--python ...]      # add --comfyui PATH for ComfyUI
    python install.py --uninstall [--sd-scripts PATH] [--comfyui PATH] [--python ...]
    python install.py                                            # ComfyUI-Manager: requirements only

Every step is idempotent. Nothing inside the sd-scripts or ComfyUI source trees is edited.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(PACK_DIR))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd-scripts", metavar="PATH", help="kohya-ss sd-scripts checkout to patch at start-up")
    p.add_argument("--musubi-tuner", metavar="PATH", help="kohya-ss musubi-tuner checkout to patch at start-up")
    p.add_argument("--onetrainer", metavar="PATH", help="OneTrainer checkout to patch at start-up (CLI and GUI)")
    p.add_argument("--comfyui", metavar="PATH", help="ComfyUI folder whose custom_nodes/ gets this pack")
    p.add_argument("--python", metavar="PATH",
                   help="python of the target environment (default: the one running this script)")
    p.add_argument("--copy", action="store_true", help="ComfyUI: copy the pack instead of linking it")
    p.add_argument("--check", action="store_true", help="report what is installed and whether patch points exist")
    p.add_argument("--uninstall", action="store_true", help="remove what install.py added")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    python = args.python or sys.executable
    rc = 0
    # --check / --uninstall with no folder act on the sd-scripts environment (its start-up hook
    # lives in --python's site-packages); no flag at all is ComfyUI-Manager's requirements step.
    if args.musubi_tuner:
        from immiscible_host import installer
        from musubi_patch.host import HOST as MUSUBI

        rc |= installer.main(MUSUBI, args.musubi_tuner, python=python, check=args.check, uninstall=args.uninstall)
    if args.onetrainer:
        from immiscible_host import installer
        from onetrainer_patch.host import HOST as ONETRAINER

        rc |= installer.main(ONETRAINER, args.onetrainer, python=python, check=args.check, uninstall=args.uninstall)
    others = args.musubi_tuner or args.onetrainer
    if args.sd_scripts or ((args.check or args.uninstall) and not (args.comfyui or others)):
        from immiscible_host import installer
        from kohya_patch.host import HOST as SD_SCRIPTS

        rc |= installer.main(SD_SCRIPTS, args.sd_scripts, python=python, check=args.check, uninstall=args.uninstall)
    if args.comfyui or not (args.sd_scripts or others or args.check or args.uninstall):
        from comfy_nodes import installer as comfy_installer

        rc |= comfy_installer.main(comfyui=args.comfyui, python=args.python, copy=args.copy, check=args.check,
                                   uninstall=args.uninstall)
    return rc


if __name__ == "__main__":
    sys.exit(main())
