"""A column-parallel linear whose input-gradient collective overlaps the weight-gradient GEMM.

The column-parallel layer's input x is replicated over TP (or, with SP, gathered from sequence
shards), so its gradient is a partial sum on each rank: all-reduced over TP (reduce-scattered under
SP). Autograd would run the input-gradient GEMM, then the collective (in `copy_to_tp` or
`gather_from_sp`, blocking), then the weight-gradient GEMM. Here the collective is launched
asynchronously right after the input-gradient GEMM and waited on after the weight-gradient GEMM
(Megatron's async TP all-reduce), so on gloo the transfer runs in gloo's thread while this rank
computes. Same GEMMs, same collective, same bytes: the gradients are those of the plain path.

    forward   x [s(/tp), b, in] -(gather under SP)-> x_full [s, b, in] -> y = x_full W^T + b [s, b, out/tp]
    backward  gx = gy W (launch all-reduce / reduce-scatter) ; gW = gy^T x_full ; gb ; wait -> gx
"""
from __future__ import annotations

import torch

from .state import Group


class _LinearAsyncGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tp: Group, sequence_parallel: bool):
        x_full = tp.all_gather(x, dim=0) if sequence_parallel else x          # [s, b, in]
        ctx.save_for_backward(x_full, weight)
        ctx.tp, ctx.sp, ctx.has_bias = tp, sequence_parallel, bias is not None
        return torch.nn.functional.linear(x_full, weight, bias)             # [s, b, out/tp]

    @staticmethod
    def backward(ctx, grad):
        x_full, weight = ctx.saved_tensors
        tp = ctx.tp
        grad = grad.contiguous()
        grad_x = grad.matmul(weight)                                         # [s, b, in], partial over TP
        n = grad_x.shape[0] // tp.size
        if ctx.sp and tp.sp_reduce == "reduce_scatter":
            out = torch.empty((n,) + tuple(grad_x.shape[1:]), dtype=grad_x.dtype, device=grad_x.device)
            work = tp.reduce_scatter_async(out.view(-1), grad_x.view(-1))   # [s/tp, b, in]
        elif ctx.sp:                             # gloo: all-reduce, then this rank's slice (state.py)
            out, work = grad_x[tp.rank * n:(tp.rank + 1) * n], tp.all_reduce_async(grad_x)
        else:
            out, work = grad_x, tp.all_reduce_async(grad_x)
        g2 = grad.reshape(-1, grad.shape[-1])                                # [s*b, out/tp]
        grad_w = g2.t().mm(x_full.reshape(-1, x_full.shape[-1]))             # [out/tp, in]
        grad_b = g2.sum(0) if ctx.has_bias else None
        if work is not None:
            work.wait()
        return out, grad_w, grad_b, None, None


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp: Group,
                  sequence_parallel: bool) -> torch.Tensor:
    """[s(/tp), b, in] -> [s, b, out/tp]: the column-parallel linear with its input-gradient collective
    overlapped with the weight-gradient GEMM (for tp > 1)."""
    return _LinearAsyncGrad.apply(x, weight, bias, tp, sequence_parallel)
