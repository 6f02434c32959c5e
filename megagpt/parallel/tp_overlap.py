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

Gradient-accumulation fusion (Megatron's `gradient_accumulation_fusion`, train.grad_accum_fusion): when
the grad buffer marks a weight (FUSE_WGRAD: it has an fp32 `main_grad` of the weight's own dtype), the
weight-gradient GEMM adds straight into `main_grad` (addmm, beta 1) instead of producing a new [out, in]
tensor that the buffer's hook would then add and free; backward returns a never-read placeholder and flags
the weight, so the hook only does its bucket bookkeeping (optim/grad_buffer.py). `linear` is the plain
(no-collective) linear with that backward, for TP = 1 and the row-parallel GEMM. A weight takes this path
only through its own linear module, so no other use of it adds a real gradient to the placeholder.
"""
from __future__ import annotations

import torch

from .state import Group


FUSE_WGRAD = "fuse_wgrad"              # set on a weight by the grad buffer when its gradient may be fused
ADDED = "grad_added_to_main_grad"      # set by backward: the hook must not add the placeholder


def fuses(weight: torch.Tensor) -> bool:
    """Whether this forward's weight gradient goes straight into weight.main_grad (decided in forward, so a
    compiled graph never traces the side effect: compiled blocks keep the plain gradient)."""
    return (getattr(weight, FUSE_WGRAD, False) and weight.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def weight_grad(param: torch.Tensor | None, g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """g2 [n, out], x2 [n, in] -> dL/dW [out, in]. param: the weight Parameter itself when fused (not its
    saved tensor, which activation recompute unpacks as another tensor object, without main_grad): the
    gradient is added into param.main_grad and a placeholder returned."""
    if param is None:
        return g2.t().mm(x2)
    param.main_grad.addmm_(g2.t(), x2)                                  # main_grad += g2^T x2
    setattr(param, ADDED, True)
    return torch.empty_like(param)           # AccumulateGrad takes it as p.grad; the hook drops it unread


def param_grads(ctx, grad: torch.Tensor, x: torch.Tensor) -> tuple:
    """grad [s, b, out], x [s, b, in] -> (dL/dW [out, in] or its placeholder, dL/db [out] or None): the
    weight and bias gradients of both linear Functions below (ctx.param, ctx.has_bias set in forward)."""
    g2 = grad.reshape(-1, grad.shape[-1])                                # [s*b, out]
    return weight_grad(ctx.param, g2, x.reshape(-1, x.shape[-1])), (g2.sum(0) if ctx.has_bias else None)


class _Linear(torch.autograd.Function):
    """y = x W^T + b whose weight gradient is fused into main_grad (see the module docstring)."""
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.param = bias is not None, weight
        return torch.nn.functional.linear(x, weight, bias)              # [s, b, out]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None  # [s, b, in]
        return (grad_x, *param_grads(ctx, grad, x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the weight gradient fused into main_grad when the grad buffer allows it."""
    if fuses(weight):
        return _Linear.apply(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


class _LinearAsyncGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tp: Group, sequence_parallel: bool, fuse: bool):
        x_full = tp.all_gather(x, dim=0) if sequence_parallel else x          # [s, b, in]
        ctx.save_for_backward(x_full, weight)
        ctx.tp, ctx.sp, ctx.has_bias, ctx.param = tp, sequence_parallel, bias is not None, weight if fuse else None
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
        grad_w, grad_b = param_grads(ctx, grad, x_full)                     # [out/tp, in], [out/tp]
        if work is not None:
            work.wait()
        return out, grad_w, grad_b, None, None, None


def column_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tp: Group,
                  sequence_parallel: bool, fuse: bool = True) -> torch.Tensor:
    """[s(/tp), b, in] -> [s, b, out/tp]: the column-parallel linear with its input-gradient collective
    overlapped with the weight-gradient GEMM (for tp > 1). fuse=False: never into main_grad (a weight
    that is also used elsewhere, the tied embedding)."""
    return _LinearAsyncGrad.apply(x, weight, bias, tp, sequence_parallel, fuse and fuses(weight))
