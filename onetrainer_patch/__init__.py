"""OneTrainer adapter: the immiscible options in OneTrainer's training config, CLI and GUI, with no
edits to OneTrainer.

Activated by the start-up hook that ``install.py --onetrainer PATH --python VENV_PY`` writes, so
``scripts/train.py`` and the GUI both get it. Importing this package imports nothing heavy.
"""
