"""Token dispatch for expert parallelism: permute by expert, all-to-all, and back.

    plan = dispatch_plan(expert_of, num_experts, ep)          # counts exchanged once per layer call
    xe, counts = dispatch(x[token_of], plan)                  # [R, h] grouped by local expert
    ye = experts(xe, counts)                                  # [R, h]
    out = combine(ye, weight, token_of, num_tokens, plan)     # [N, h]: sum_j weight_j * ye_j

Selections are (token, expert, weight) triples, one per kept top-k choice. They are sorted by
expert (stable, so within an expert in token order); the experts are split over the ep ranks in
contiguous blocks (rank r holds experts [r*E/ep, (r+1)*E/ep)), so the sorted rows already come in
destination-rank order. The ranks first exchange their per-expert counts (an all-to-all of E
integers), then the rows with variable splits; the received rows arrive grouped by (source rank,
local expert) and are regrouped by (local expert, source rank) so each local expert reads one
contiguous block. combine undoes every step in reverse and sums each token's rows weighted by
their router probability (index_add in the sorted order: the same order in every layout).
Every step is differentiable (mappings.all_to_all is the conjugate pair), a rank or an expert
with zero rows is an empty block, and with ep = 1 no collective runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .mappings import all_to_all
from .state import Group


@dataclass
class DispatchPlan:
    order: torch.Tensor            # [M] selection indices sorted by expert (stable)
    send: list[int]                # rows to each ep rank
    recv: list[int]                # rows from each ep rank
    regroup: torch.Tensor | None   # received row -> (local expert, source) order; None when ep = 1
    local_counts: list[int]        # rows per local expert after regrouping
    ep: Group


def dispatch_plan(expert_of: torch.Tensor, num_experts: int, ep: Group) -> DispatchPlan:
    """expert_of [M]: each selection's global expert. Exchanges the counts (no gradient)."""
    order = torch.argsort(expert_of, stable=True)                           # [M]
    counts = torch.bincount(expert_of, minlength=num_experts)              # [E]
    local = num_experts // ep.size
    if ep.size == 1:
        return DispatchPlan(order, [], [], None, counts.tolist(), ep)
    by_rank = counts.view(ep.size, local)                                  # [ep, E_l]: to rank j, expert e
    got = ep.all_to_all(by_rank.contiguous(), [1] * ep.size, [1] * ep.size)   # [ep, E_l]: from rank j
    send, recv = by_rank.sum(1).tolist(), got.sum(1).tolist()
    # received rows: blocks (source j, local expert e) in that order; regroup to (e, j)
    starts = torch.cumsum(got.reshape(-1), 0) - got.reshape(-1)            # [ep*E_l] start of block (j, e)
    blocks = [(int(starts[j * local + e]), int(got[j, e])) for e in range(local) for j in range(ep.size)]
    regroup = torch.cat([torch.arange(s, s + n) for s, n in blocks]) if blocks else torch.zeros(0, dtype=torch.long)
    return DispatchPlan(order, send, recv, regroup.to(expert_of.device), got.sum(0).tolist(), ep)


def dispatch(rows: torch.Tensor, plan: DispatchPlan) -> tuple[torch.Tensor, list[int]]:
    """rows [M, h] (one per selection, any order) -> [R, h] grouped by local expert, and the counts."""
    x = rows[plan.order]                                                   # [M, h] sorted by expert
    if plan.ep.size > 1:
        x = all_to_all(x, plan.ep, plan.recv, plan.send)                   # [R, h] by (source, expert)
        x = x[plan.regroup]                                                # [R, h] by (expert, source)
    return x, plan.local_counts


def combine(y: torch.Tensor, weight: torch.Tensor, token_of: torch.Tensor, num_tokens: int,
            plan: DispatchPlan) -> torch.Tensor:
    """y [R, h] from the local experts -> [N, h]: each token's rows times their weight [M], summed."""
    if plan.ep.size > 1:
        back = torch.empty_like(plan.regroup)
        back[plan.regroup] = torch.arange(plan.regroup.numel(), device=back.device)
        y = all_to_all(y[back], plan.ep, plan.send, plan.recv)             # [M, h] sorted by expert
    y = y * weight[plan.order].unsqueeze(-1).to(y.dtype)
    out = y.new_zeros((num_tokens, y.shape[-1]))
    return out.index_add(0, token_of[plan.order], y)                       # [N, h]
