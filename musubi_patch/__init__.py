"""kohya-ss musubi-tuner adapter: ``--immiscible_k`` in every trainer, with no edits to musubi-tuner.

Activated by the start-up hook that ``install.py --musubi-tuner PATH`` writes, or explicitly with
``python -m musubi_patch.run SCRIPT.py ARGS...``. Importing this package imports nothing heavy.
"""
