"""Fused optimizers (docs/design.md, "Optimizers"): torch's AdamW, Adam and SGD, and Lion,
each stepping all parameters of one device and dtype in one multi-tensor pass, with decoupled
weight decay and an L1 proximal step (``l1``) fused into the update. ``optimizer.sparsity()`` reports the
fraction of exactly-zero entries per param group."""
from .adam import Adam, AdamW
from .lion import Lion
from .sgd import SGD

__all__ = ["Adam", "AdamW", "Lion", "SGD"]
