"""RMSNorm (default) and LayerNorm through torch's fused functional ops.

On the CPU, F.rms_norm under autograd records its decomposition (pow, mean, add, rsqrt, mul, mul:
six backward nodes and their saved tensors); `RMSNormCPU` runs the fused forward kernel instead
(bit-identical output) and a four-pass backward, saving x and the [.., 1] rstd only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import REPLICATED, make_param


class RMSNormCPU(torch.autograd.Function):
    """y = x * rstd * w, rstd = rsqrt(mean(x^2) + eps), over the last dim; fp32 on the CPU."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)   # rstd [.., 1]
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        h = x.shape[-1]
        xh = x * rstd                                            # x normalised [.., h]
        dw = (g * xh).reshape(-1, h).sum(0) if ctx.needs_input_grad[1] else None   # [h]
        gw = g * weight
        c = (gw * xh).sum(-1, keepdim=True).div_(h)              # mean(g w xh) [.., 1]
        return gw.addcmul_(xh, c, value=-1.0).mul_(rstd), dw, None   # rstd (g w - xh c)


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
            if x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled() \
                    and not torch.compiler.is_compiling():       # compiled: inductor fuses F.rms_norm itself
                return RMSNormCPU.apply(x, self.weight, self.eps)
            return F.rms_norm(x, (self.hidden,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden,), self.weight, self.bias, self.eps)
