"""The compute type of every kernel: float32 math for float16/bfloat16/float32 tensors,
float64 for float64 ones. Norm statistics and optimizer state are kept in it too."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
