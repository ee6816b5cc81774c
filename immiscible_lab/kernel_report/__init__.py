"""The Triton kernels' tooling, kept out of the shipped core: launch plans (``plan.py``), the
ahead-of-time compile and resource report for every GPU generation (``aot.py``,
``python -m immiscible_lab.kernel_report.aot``) and the occupancy / roofline model (``perf_model.py``).

Needs triton; trainer environments never import it.
"""
