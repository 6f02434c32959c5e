"""Gradient finalisation: after backward (and the DP reduction), complete what TP and the pipeline
left partial, so every rank holds its piece of the global model's gradient. The one home of these
rules: training (`Optimizer.step`) and the tests both call `finalize_grads`.

1. TP-partial gradients, read from each parameter's ParamMeta:
   - parameters replicated over TP but applied to sequence shards (meta.sequence_parallel: norm
     weights and row-parallel biases under SP): summed over TP, one all-reduce of all of them;
   - K/V rows replicated over TP ranks (fewer KV heads than TP ranks): each replica saw only its
     own query heads, so the replicas' gradients are summed. One all-reduce per parameter: each
     rank writes its piece into its head's slot of a zero buffer, and the sum is read back.
2. Tied parameters (meta.tied): the copies of one tied group on different pipeline stages (the word
   embedding on the first stage, its copy for the LM head on the last) are one parameter, so their
   gradients are summed over the group's ranks (ps.embedding) and both copies take the same step.

`grad_of` picks where the gradient lives: the optimizer's fp32 `p.main_grad` (training) or `p.grad`.
With the distributed optimizer only the owned shard is right after the reduce-scatter; TP peers
(and the two embedding stages, whose embedding sits alone in a bucket) share the same layout, so
summing whole tensors still leaves the owned part right.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..parallel.layers import meta_of
from ..parallel.state import Group, ParallelState


def main_grad(p: torch.Tensor):
    return getattr(p, "main_grad", None)


def finalize_grads(chunks: list[nn.Module], ps: ParallelState, grad_of=main_grad) -> None:
    """Call on every rank after backward (and the DP sync): TP-partial gradients, then tied ones."""
    for chunk in chunks:
        finalize_tp_grads(chunk, ps.tp, grad_of)
    groups = {"embedding": ps.embedding}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            tied = meta_of(p).tied
            if tied is None or not p.requires_grad:      # frozen (train.freeze_lm): on every stage alike
                continue
            if grad_of(p) is None:  # its peer would wait in the all-reduce forever
                raise RuntimeError(f"tied parameter {name} (group {tied}) has no gradient on pp rank {ps.pp.rank}")
            groups[tied].all_reduce(grad_of(p))


def finalize_tp_grads(module: nn.Module | list, tp: Group, grad_of=main_grad) -> None:
    """The TP half of finalize_grads, for one module or a list of params (see the module docstring)."""
    if tp.size == 1:
        return
    params = [(p, meta_of(p), grad_of(p)) for p in (module.parameters() if isinstance(module, nn.Module) else module)]
    tp.all_reduce_coalesced([g for _, meta, g in params if g is not None and meta.sequence_parallel])
    for p, meta, grad in params:
        spec = meta.spec
        if grad is None or spec.dim is None:
            continue
        local_offset = 0
        for idx, ((_, heads), (_, n)) in enumerate(zip(spec.parts, spec._slices(tp.rank, tp.size))):
            replicas = spec.replicas(idx, tp.size)
            if replicas > 1:
                head = tp.rank // replicas                       # the KV head this rank's queries use
                piece = grad.narrow(spec.dim, local_offset, n)
                slots = torch.zeros((heads,) + tuple(piece.shape), dtype=piece.dtype, device=piece.device)
                slots[head] = piece
                tp.all_reduce(slots)
                piece.copy_(slots[head])
            local_offset += n
