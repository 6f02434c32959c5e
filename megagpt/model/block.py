"""One pre-norm transformer layer: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))).
The MLP is a mixture of experts (moe.py) on the layers model.is_moe_layer picks; on the layers of
model.mod_layers a mixture-of-depths router (mod.py) sends only some tokens through the block."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..parallel.random import RNGTracker, dropout
from ..parallel.state import Group
from .attention import Attention
from .mlp import MLP
from .mod import MoDRouter
from .moe import MoE, MoEContext
from .norm import Norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group, sequence_parallel: bool, tracker: RNGTracker | None,
                 selective_recompute: bool = False, device=None, dtype=None, cp: Group | None = None,
                 layer_id: int = 0, ep: Group | None = None, moe_context: MoEContext | None = None):
        super().__init__()
        self.cfg, self.tracker, self.sp, self.cp = cfg, tracker, sequence_parallel, cp
        self.norm1 = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, sequence_parallel, device, dtype)
        self.attention = Attention(cfg, tp, sequence_parallel, tracker, selective_recompute, device, dtype, cp)
        self.norm2 = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, sequence_parallel, device, dtype)
        if cfg.is_moe_layer(layer_id):
            self.mlp = MoE(cfg, layer_id, tp, ep, sequence_parallel, moe_context, device, dtype, cp)
        else:
            self.mlp = MLP(cfg, tp, sequence_parallel, device, dtype)
        self.mod = MoDRouter(cfg.hidden_size, cfg.mod_capacity, layer_id, moe_context, device, dtype) \
            if layer_id in (cfg.mod_layers or ()) else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
        if self.mod is None:
            return self._body(x, cos, sin, cache, mask)
        if mask is not None:
            raise NotImplementedError("model.mod_layers: packed samples through a mixture-of-depths layer are not "
                                      "supported (its top-k picks tokens across the samples)")
        if cache is not None or (self.mod.context.causal_routing and not self.training):
            return self.mod.causal(x, cos, sin, self._body, cache)        # generation: the causal predictor routes
        return self.mod(x, cos, sin, self._body)

    def _body(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
        # x: [s/tp, b, h] with SP, else [s, b, h] replicated over TP
        p = self.cfg.hidden_dropout
        attn = self.attention(self.norm1(x), cos, sin, cache, mask)
        x = x + dropout(attn, p, self.training, self.tracker, self.sp, self.cp)
        x = x + dropout(self.mlp(self.norm2(x)), p, self.training, self.tracker, self.sp, self.cp)
        return x
