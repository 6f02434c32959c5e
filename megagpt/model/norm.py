"""RMSNorm (default) and LayerNorm through torch's fused functional ops."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import REPLICATED, make_param


class Norm(nn.Module):
    """Applied to [s(/tp), b, h]. Under SP each rank normalises its own sequence shard, so the
    weight's gradient is partial over TP (`sequence_parallel=True` marks it for the TP sum)."""

    def __init__(self, hidden: int, kind: str, eps: float, sequence_parallel: bool, device=None, dtype=None):
        super().__init__()
        self.kind, self.eps, self.hidden = kind, eps, hidden
        self.weight = make_param((hidden,), REPLICATED, 1, device, dtype, sequence_parallel)
        self.bias = make_param((hidden,), REPLICATED, 1, device, dtype, sequence_parallel) \
            if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (self.hidden,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden,), self.weight, self.bias, self.eps)
