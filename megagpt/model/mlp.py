"""MLPs: SwiGLU, GeGLU (gated) and GELU.

The gated fc1 weight's global layout is [gate (ffn rows); up (ffn rows)]; TP rank r holds
[gate_r; up_r], so the product gate * up pairs matching slices without any communication.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, ShardSpec
from ..parallel.state import Group


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group, sequence_parallel: bool, device=None, dtype=None):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.kind = cfg.mlp
        if cfg.gated:
            spec = ShardSpec(0, ((f, 0), (f, 0)))
            self.fc1 = ColumnParallelLinear(h, 2 * f, tp, sequence_parallel, spec, cfg.bias, device, dtype)
        else:
            self.fc1 = ColumnParallelLinear(h, f, tp, sequence_parallel, None, cfg.bias, device, dtype)
        self.fc2 = RowParallelLinear(f, h, tp, sequence_parallel, cfg.bias, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)                                          # [s, b, 2f/tp] or [s, b, f/tp]
        if self.kind == "gelu":
            y = F.gelu(y)
        else:
            gate, up = y.chunk(2, dim=-1)                        # [s, b, f/tp] each
            y = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate)) * up
        return self.fc2(y)                                       # [s(/tp), b, h]
