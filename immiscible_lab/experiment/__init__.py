"""The built-in A/B experiment behind ``python -m immiscible_lab demo``.

Small diffusion models (eps-prediction DDPM and rectified flow) trained on data shipped with
scikit-learn or drawn with a fixed seed, under vanilla, knn and assign noise pairing, at equal
compute and several seeds; the report compares sample quality, straightness, noise statistics
and pairing cost, with a verdict computed from the runs.
"""
from .demo import run_demo
from .effect import effect_table, format_effect_table
from .runner import DemoConfig, preset
from .train import TrainConfig

__all__ = ["DemoConfig", "TrainConfig", "effect_table", "format_effect_table", "preset", "run_demo"]
