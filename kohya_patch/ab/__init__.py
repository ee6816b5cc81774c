"""The A/B command for sd-scripts: ``python -m kohya_patch.ab --k 4 -- accelerate launch train_network.py ...``
(see :mod:`kohya_patch.ab.cli`)."""
