"""kohya-ss sd-scripts adapter: ``--immiscible_k`` in every trainer, with no edits to sd-scripts.

Activated by the start-up hook that ``install.py --sd-scripts PATH`` writes, or explicitly with
``python -m kohya_patch.run SCRIPT.py ARGS...``. Importing this package imports nothing heavy.
"""
