"""Triton kernels. Imported lazily, only when the triton package is installed."""
