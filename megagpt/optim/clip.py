"""Global gradient norm over TP, PP and DP, each element of the global model counted once, and clipping.

Which gradient elements a rank counts:
  - TP: a parameter replicated over TP (meta.spec.dim None: norms, row-parallel biases) on tp rank 0
    only; a sharded one everywhere, except segments replicated over several TP ranks (the K/V rows
    when there are fewer KV heads than TP ranks), counted on the first replica of each head only;
  - PP: a tied parameter's extra copy (meta.tied_copy: the embedding's on the last stage) is not
    counted (the first stage counts it);
  - DP: with the distributed optimizer each DP rank counts the shard it owns (the squares are then
    summed over the world); with the plain optimizer every DP rank holds everything, so the sum
    runs over one model replica only (the model-parallel group).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..parallel.layers import meta_of
from ..parallel.state import Group


def counted_ranges(p: nn.Parameter, tp: Group) -> list[tuple[int, int]]:
    """Flat [lo, hi) ranges of p's local tensor that this TP rank counts (before DP ownership)."""
    n = p.numel()
    meta = meta_of(p)
    spec = meta.spec
    if meta.tied_copy:
        return []
    if tp.size == 1:
        return [(0, n)]
    if spec.dim is None:
        return [(0, n)] if tp.rank == 0 else []
    reps = [spec.replicas(i, tp.size) for i in range(len(spec.parts))]
    if all(r == 1 for r in reps):
        return [(0, n)]
    if spec.dim != 0:
        raise ValueError(f"grad norm: TP-replicated segments are only supported along dim 0, got dim {spec.dim}")
    row = n // p.shape[0]                                     # elements per row of dim 0
    out, offset = [], 0
    for r, (_, length) in zip(reps, spec._slices(tp.rank, tp.size)):
        if r == 1 or tp.rank % r == 0:                        # a replica group is tp ranks [h*r, (h+1)*r)
            if out and out[-1][1] == offset * row:
                out[-1] = (out[-1][0], (offset + length) * row)
            else:
                out.append((offset * row, (offset + length) * row))
        offset += length
    return out


def intersect(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    return [(max(a, lo), min(b, hi)) for a, b in ranges if max(a, lo) < min(b, hi)]


def global_norm(views: list[torch.Tensor], group: Group, device) -> float:
    """sqrt of the sum of squares of `views` over every rank of `group` (fp64 accumulation)."""
    local = torch.zeros(1, dtype=torch.float64, device=device)
    if views:
        local += torch.stack(torch._foreach_norm(views)).double().square().sum()
    group.all_reduce(local)
    return math.sqrt(local.item())


def clip_(views: list[torch.Tensor], max_norm: float, norm: float) -> float:
    """Scale the gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does.
    Returns the coefficient used."""
    if max_norm <= 0 or not math.isfinite(norm):
        return 1.0
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0 and views:
        torch._foreach_mul_(views, coef)
    return min(coef, 1.0)
