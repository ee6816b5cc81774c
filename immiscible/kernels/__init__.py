"""Triton kernels. Import lazily: triton is an optional extra."""
