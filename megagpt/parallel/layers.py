"""Tensor-parallel layers, the ShardSpec that says how each parameter is split over TP, and ParamMeta.

Every parameter carries `p.meta`, a ParamMeta: its global shape, its ShardSpec, its
sequence-parallel flag and its tied group (see ParamMeta). With it, checkpoints, conversion,
resharding, gradient finalisation and the grad norm never need to know the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mappings import reduce_from_tp, reduce_scatter_to_sp
from .tp_overlap import column_linear, linear
from .state import Group


@dataclass(frozen=True)
class ShardSpec:
    """How a global tensor maps to TP rank r's local tensor.

    dim=None: replicated. Otherwise the global tensor is cut along `dim` into consecutive
    segments `parts` = ((length, heads), ...). A segment with heads=0 is split evenly over TP
    ranks; a segment of `heads` attention heads (the K or V rows of grouped-query attention)
    is split by whole heads when heads % tp == 0, and otherwise each rank takes the one head
    its query heads use (heads are then replicated over tp // heads ranks). The local tensor
    is the concatenation of this rank's slice of every segment: e.g. the fused QKV weight is
    [Q_r; K_r; V_r] and the fused SwiGLU weight is [gate_r; up_r].
    """
    dim: int | None = None
    parts: tuple = ()

    def _slices(self, rank: int, size: int):
        """(global_start, length) of this rank's piece of each segment."""
        out, start = [], 0
        for length, heads in self.parts:
            if heads == 0 or heads % size == 0:
                if length % size:
                    raise ValueError(f"ShardSpec: a segment of {length} rows cannot be split over tp={size}")
                piece = length // size
                out.append((start + rank * piece, piece))
            else:
                head_len = length // heads
                head = rank // (size // heads)
                out.append((start + head * head_len, head_len))
            start += length
        return out

    def pieces(self, rank: int, size: int) -> list[tuple[int, int, int]]:
        """(local_start, global_start, length) along `dim` of each segment of rank's local tensor."""
        out, local = [], 0
        for start, n in self._slices(rank, size):
            out.append((local, start, n))
            local += n
        return out

    def replicas(self, part: int, size: int) -> int:
        """How many TP ranks hold the same rows of segment `part`."""
        heads = self.parts[part][1]
        return 1 if heads == 0 or heads % size == 0 else size // heads

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        if self.dim is None or size == 1:
            return full
        return torch.cat([full.narrow(self.dim, s, n) for s, n in self._slices(rank, size)], dim=self.dim)

    def unshard(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        size = len(pieces)
        if self.dim is None or size == 1:
            return pieces[0]
        segments = []
        for p_idx, (length, heads) in enumerate(self.parts):
            offset = sum(n for n_idx, (_, n) in enumerate(self._slices(0, size)) if n_idx < p_idx)
            n = self._slices(0, size)[p_idx][1]
            step = self.replicas(p_idx, size)
            # one copy of every distinct slice, in rank order
            segments += [pieces[r].narrow(self.dim, offset, n) for r in range(0, size, step)]
        return torch.cat(segments, dim=self.dim)

    def local_shape(self, global_shape: tuple, size: int) -> tuple:
        if self.dim is None or size == 1:
            return tuple(global_shape)
        shape = list(global_shape)
        shape[self.dim] = sum(n for _, n in self._slices(0, size))
        return tuple(shape)


def split_spec(dim: int, length: int) -> ShardSpec:
    return ShardSpec(dim, ((length, 0),))


REPLICATED = ShardSpec()


@dataclass(frozen=True)
class ParamMeta:
    """What every parameter carries as `p.meta` (attached where it is created: make_param, GPTModel)."""
    global_shape: tuple                 # the whole, unsharded tensor (what a checkpoint stores)
    spec: ShardSpec = REPLICATED        # the map between the global tensor and this TP rank's piece
    sequence_parallel: bool = False     # replicated over TP but applied to sequence shards: its
                                        # gradient is partial on each TP rank and summed over TP
    tied: str | None = None             # tied group: its copies on other pipeline stages are one
                                        # parameter ("embedding": the word embedding and the LM head)
    tied_copy: bool = False             # this is a stage's extra copy of a tied parameter: never
                                        # saved, not counted in the grad norm (its owner counts)
    expert: bool = False                # an expert weight (model/moe.py): dim 0 (the experts) is split
                                        # evenly over the ep ranks; its grads reduce over edp, not dp

    def ep_shard(self, full: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
        """This ep rank's experts of a global tensor (the whole tensor for a non-expert weight)."""
        if not self.expert or ep_size == 1:
            return full
        n = self.global_shape[0] // ep_size
        return full.narrow(0, ep_rank * n, n)


def meta_of(p: torch.Tensor) -> ParamMeta:
    """p.meta, or what a plain tensor is: replicated, its own shape, untied."""
    return getattr(p, "meta", None) or ParamMeta(tuple(p.shape))


def make_param(shape_global: tuple, spec: ShardSpec, tp_size: int, device=None, dtype=None,
               sequence_parallel: bool = False) -> nn.Parameter:
    p = nn.Parameter(torch.empty(spec.local_shape(shape_global, tp_size), device=device, dtype=dtype))
    p.meta = ParamMeta(tuple(shape_global), spec, sequence_parallel)
    return p


class VocabParallelEmbedding(nn.Module):
    """Rows of the (padded) vocab split over TP. Tokens [b, s] -> [s, b, h] ([s/tp, b, h] with SP)."""

    def __init__(self, padded_vocab: int, hidden: int, tp: Group, sequence_parallel: bool, device=None, dtype=None):
        super().__init__()
        self.tp, self.sp = tp, sequence_parallel
        self.rows = padded_vocab // tp.size
        self.start = tp.rank * self.rows
        self.weight = make_param((padded_vocab, hidden), split_spec(0, padded_vocab), tp.size, device, dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.t()                                         # [s, b]
        if self.tp.size > 1:
            outside = (ids < self.start) | (ids >= self.start + self.rows)
            local = (ids - self.start).masked_fill(outside, 0)
            out = F.embedding(local, self.weight)                # [s, b, h] partial: zeros outside this shard
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = F.embedding(ids, self.weight)
        if self.sp:
            return reduce_scatter_to_sp(out, self.tp)            # [s/tp, b, h]
        return reduce_from_tp(out, self.tp)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over TP. [s(/tp), b, in] -> [s, b, out/tp]."""

    def __init__(self, in_features: int, out_features: int, tp: Group, sequence_parallel: bool,
                 spec: ShardSpec | None = None, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.tp, self.sp = tp, sequence_parallel
        spec = spec or split_spec(0, out_features)
        self.weight = make_param((out_features, in_features), spec, tp.size, device, dtype)
        self.bias = make_param((out_features,), ShardSpec(0 if spec.dim == 0 else None, spec.parts), tp.size,
                               device, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1:   # the input-gradient collective overlaps the weight-gradient GEMM
            return column_linear(x, self.weight, self.bias, self.tp, self.sp)     # [s, b, out/tp]
        return linear(x, self.weight, self.bias)                                # [s, b, out]


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over TP. [s, b, in/tp] -> [s(/tp), b, out]."""

    def __init__(self, in_features: int, out_features: int, tp: Group, sequence_parallel: bool,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.tp, self.sp = tp, sequence_parallel
        self.weight = make_param((out_features, in_features), split_spec(1, in_features), tp.size, device, dtype)
        self.bias = make_param((out_features,), REPLICATED, tp.size, device, dtype,
                               sequence_parallel=sequence_parallel) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)                               # [s, b, out] partial sums
        y = reduce_scatter_to_sp(y, self.tp) if self.sp else reduce_from_tp(y, self.tp)
        return y + self.bias if self.bias is not None else y


def parallel_lm_logits(x: torch.Tensor, weight: torch.Tensor, tp: Group, sequence_parallel: bool) -> torch.Tensor:
    """The output layer as a column-parallel matmul with the tied embedding weight [V/tp, h]: its gradient
    also comes from the embedding lookup, so it is never fused into main_grad."""
    if tp.size > 1:
        return column_linear(x, weight, None, tp, sequence_parallel, fuse=False)    # [s, b, V/tp]
    return F.linear(x, weight)                                                      # [s, b, V]


def init_std_for(name: str, std: float, num_layers: int, scaled: bool) -> float:
    """Output projections (attention proj, MLP fc2) get std/sqrt(2L) so the residual stream's
    variance stays O(1) with depth (GPT-2 / Megatron's scaled init)."""
    if scaled and (name.endswith("proj.weight") or name.endswith("fc2.weight")):
        return std / math.sqrt(2.0 * num_layers)
    return std
