"""Collectives as conjugate autograd pairs (Megatron style).

Each function's backward is the adjoint of its forward:
    copy_to_tp          fwd identity        bwd all-reduce      (input of a column-parallel layer, no SP)
    reduce_from_tp      fwd all-reduce      bwd identity        (output of a row-parallel layer, no SP)
    gather_from_sp      fwd all-gather(s)   bwd reduce-scatter  (input of a column-parallel layer, SP)
    reduce_scatter_to_sp fwd reduce-scatter bwd all-gather      (output of a row-parallel layer, SP)
    scatter_to_sp       fwd split(s)        bwd all-gather      (entering an SP region from a replicated one)
    gather_to_full      fwd all-gather(s)   bwd split           (leaving an SP region into a replicated one)
    all_to_all          fwd all-to-all      bwd all-to-all with the splits swapped (expert dispatch)
Activations are [s, b, h]: the sequence dim is 0, so SP shards are [s/tp, b, h].
The column-parallel layers fuse their input mapping (copy_to_tp / gather_from_sp) with the GEMM
(tp_overlap.py), so that the backward's collective overlaps the weight-gradient GEMM.
"""
from __future__ import annotations

import torch

from .state import Group


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_reduce(grad.contiguous().clone()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if x.is_contiguous() and not x.is_leaf:  # a layer's fresh output: summed in place, no copy
            ctx.mark_dirty(x)
            return group.all_reduce(x)
        return group.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_gather(x, dim=0)            # [s/tp, b, h] -> [s, b, h]

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.reduce_scatter(grad, dim=0), None   # [s, b, h] -> [s/tp, b, h]


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.reduce_scatter(x, dim=0)        # [s, b, h] partial sums -> [s/tp, b, h]

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather(grad, dim=0), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_gather(grad, dim=0), None


class _GatherToFull(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_gather(x, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return _split_seq(grad, ctx.group), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, out_splits, in_splits):
        ctx.group, ctx.splits = group, (out_splits, in_splits)
        return group.all_to_all(x, out_splits, in_splits)         # [sum(in), h] -> [sum(out), h]

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return ctx.group.all_to_all(grad.contiguous(), in_splits, out_splits), None, None, None


def all_to_all(x: torch.Tensor, group: Group, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Rows of x, in_splits[j] of them to rank j; returns the out_splits[j] rows from each rank j."""
    if group.size == 1:
        return x
    return _AllToAll.apply(x, group, list(out_splits), list(in_splits))


def _split_seq(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group.size == 1:
        return x
    if x.shape[0] % group.size:
        raise ValueError(f"sequence parallel: sequence length {x.shape[0]} is not divisible by tp={group.size}")
    return x.chunk(group.size, dim=0)[group.rank].contiguous()


def _wrap(fn):
    def call(x: torch.Tensor, group: Group) -> torch.Tensor:
        if group.size == 1:
            return x
        return fn.apply(x, group)
    call.__name__ = fn.__name__
    return call


copy_to_tp = _wrap(_CopyToTP)
reduce_from_tp = _wrap(_ReduceFromTP)
gather_from_sp = _wrap(_GatherFromSP)
reduce_scatter_to_sp = _wrap(_ReduceScatterToSP)
scatter_to_sp = _wrap(_ScatterToSP)
gather_to_full = _wrap(_GatherToFull)
