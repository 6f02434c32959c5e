"""One pre-norm transformer layer: x + drop(attn(norm(x))), then x + drop(mlp(norm(x)))."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..parallel.random import RNGTracker, dropout
from ..parallel.state import Group
from .attention import Attention
from .mlp import MLP
from .norm import Norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group, sequence_parallel: bool, tracker: RNGTracker | None,
                 selective_recompute: bool = False, device=None, dtype=None):
        super().__init__()
        self.cfg, self.tracker, self.sp = cfg, tracker, sequence_parallel
        self.norm1 = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, sequence_parallel, device, dtype)
        self.attention = Attention(cfg, tp, sequence_parallel, tracker, selective_recompute, device, dtype)
        self.norm2 = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, sequence_parallel, device, dtype)
        self.mlp = MLP(cfg, tp, sequence_parallel, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
        # x: [s/tp, b, h] with SP, else [s, b, h] replicated over TP
        p = self.cfg.hidden_dropout
        x = x + dropout(self.attention(self.norm1(x), cos, sin, cache, mask), p, self.training, self.tracker, self.sp)
        x = x + dropout(self.mlp(self.norm2(x)), p, self.training, self.tracker, self.sp)
        return x
