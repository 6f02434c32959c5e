"""Mixture of experts: a router, E SwiGLU experts split over the EP ranks, an optional shared expert.

    y = shared(x) + sum_{j < k} w_j(x) * expert_{e_j(x)}(x)

Router (fp32 whatever the model dtype): logits = x W_r^T [N, E]; scores are softmax(logits) or
sigmoid(logits); the k largest are chosen and their scores are the weights, renormalised to sum to
1 when model.moe_router_norm_topk (with sigmoid scores and k > 1 they usually are).

Balancing, both attached to the gradient by `attach_aux` (no scalar ever crosses a stage):
  - load balancing (Switch / GShard, Megatron's form): coeff * E / (k T^2) * sum_e c_e S_e, with c_e
    the selections of expert e (before any capacity drop) and S_e the sum over tokens of its
    probability (softmax scores; sigmoid scores normalised per token). Equal to coeff when balanced.
  - z-loss: coeff * mean over tokens of logsumexp(logits)^2.
T is the tokens of the microbatch on one model replica. Under sequence parallelism each TP rank
holds s/tp of them, under context parallelism each CP rank s/cp (its zigzag pair of chunks): c_e is
summed over TP (with SP) and CP (an all-reduce of E integers each), S_e and the z-loss sums stay
local and are divided by the global T, so the ranks' pieces sum to the one-process loss (their
gradients meet in the TP-partial and dp x cp reductions).

Capacity (model.moe_capacity_factor): each expert takes at most C = ceil(cf * T * k / E) of the
microbatch's selections, those of highest probability (ties: the earlier token); a dropped choice
adds nothing (its token rides the residual). The decision is taken on the whole sequence (the
chosen scores are all-gathered over TP under SP, then over CP and put back in sequence order), so
drops are the same in every layout. None = dropless. In eval mode (validation, generation) the
layer runs dropless, as Megatron does at inference: a capacity over the tokens of one decode step
would drop differently than over the whole prompt, so cached decoding would not equal recompute.

Expert parallelism: experts [r E/ep, (r+1) E/ep) live on ep rank r (parallel/token_dispatch.py
moves the rows). Expert weights are whole on every TP rank; under SP each TP rank routes its own
sequence shard, so their gradients (and the router's) are TP-partial (ParamMeta.sequence_parallel,
summed by optim/finalize.py). Without SP every TP rank computes the same thing.
The expert weights are stacked: fc1 [E, 2f, h] = [gate; up] per expert, fc2 [E, h, f]; each rank
holds its E/ep experts (ParamMeta.expert: dim 0 split over ep; its grads reduce over edp).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel.context import zigzag_shard, zigzag_unshard
from ..parallel.layers import REPLICATED, ParamMeta, make_param
from ..parallel.state import Group
from ..parallel.token_dispatch import combine, dispatch, dispatch_plan
from .mlp import MLP


@dataclass
class MoEContext:
    """Shared by the MoE layers of one model chunk. scale: the weight of the aux losses in the
    objective whose gradient backward computes (1 for `model(tokens, labels).mean()`; the pipeline
    engine sets loss_scale * tokens per microbatch). Records of the training forwards, for logs and tests."""
    scale: float = 1.0
    aux: list = field(default_factory=list)        # (layer id, balancing loss, z-loss): this rank's piece
    load: dict = field(default_factory=dict)       # layer id -> selections per expert [E] (summed over TP)
    mod: list = field(default_factory=list)        # (layer id, predictor BCE, predictor accuracy): model/mod.py
    rows: list = field(default_factory=list)       # (layer id, rows sent, rows received) by the all-to-all (ep > 1)
    causal_routing: bool = False    # eval without a KV cache routes MoD layers by their predictor (generation's rule)

    def clear(self):
        self.aux.clear()
        self.load.clear()
        self.mod.clear()
        self.rows.clear()

    def dispatched_rows(self) -> int:
        """Rows this rank's dispatch all-to-alls sent plus received: what comm_model's moe_rows takes
        (with capacity drops they depend on the routing)."""
        return sum(sent + got for _, sent, got in self.rows)


class _AttachAux(torch.autograd.Function):
    """Identity on x whose backward also sends `scale` into the aux loss (MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, x, aux, scale):
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def attach_aux(x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    return _AttachAux.apply(x, aux, scale) if aux.requires_grad else x


def route(logits: torch.Tensor, cfg: ModelConfig,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [N, E] fp32 -> (weights [N, k], experts [N, k], probabilities for the balancing loss [N, E]).
    bias [E]: added to the scores for the choice only (auxiliary-loss-free balancing); the weights
    are the unbiased scores of the chosen experts."""
    k = cfg.moe_top_k
    if cfg.moe_router_score == "softmax":
        scores = torch.softmax(logits, dim=-1)
        balance = scores
    else:
        scores = torch.sigmoid(logits)
        balance = scores / scores.sum(-1, keepdim=True)
    if bias is None:
        weights, experts = torch.topk(scores, k, dim=-1)                     # [N, k]
    else:
        experts = torch.topk(scores.detach() + bias.to(scores.dtype), k, dim=-1).indices
        weights = scores.gather(-1, experts)
    if cfg.moe_router_norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts, balance


def capacity_keep(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, factor: float) -> torch.Tensor:
    """[N, k] bool: the selections kept when each expert takes at most ceil(factor * N * k / E),
    highest weight first, the earlier selection on ties."""
    n, k = experts.shape
    cap = math.ceil(factor * n * k / num_experts)
    w, e = weights.reshape(-1), experts.reshape(-1)
    order = torch.argsort(-w, stable=True)
    order = order[torch.argsort(e[order], stable=True)]                      # by expert, then weight desc
    counts = torch.bincount(e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(n * k, device=e.device) - starts[e[order]]
    keep = torch.zeros(n * k, dtype=torch.bool, device=e.device)
    keep[order] = rank_in_expert < cap
    return keep.view(n, k)


class Experts(nn.Module):
    """This rank's E/ep SwiGLU experts, stacked. forward(x [R, h] grouped by expert, counts) -> [R, h]."""

    def __init__(self, cfg: ModelConfig, ep: Group, sequence_parallel: bool, device=None, dtype=None):
        super().__init__()
        e, h, f = cfg.moe_num_experts, cfg.hidden_size, cfg.expert_ffn
        self.fc1 = _Stacked((e, 2 * f, h), ep, sequence_parallel, device, dtype)
        self.fc2 = _Stacked((e, h, f), ep, sequence_parallel, device, dtype)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        w1, w2 = self.fc1(), self.fc2()
        outs = []
        for i, rows in enumerate(x.split(counts)):                            # [n_i, h], n_i may be 0
            gate, up = F.linear(rows, w1[i]).chunk(2, dim=-1)                  # [n_i, f] each
            outs.append(F.linear(F.silu(gate) * up, w2[i]))                    # [n_i, h]
        return torch.cat(outs) if outs else x


class _Weight(nn.Module):
    """A module that only holds `weight` and returns it when called: so forward pre-hooks on the
    module (the distributed optimizer's wait for the weight's all-gather) run before it is read."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self) -> torch.Tensor:
        return self.weight


def _Stacked(global_shape, ep: Group, sequence_parallel, device, dtype) -> _Weight:
    """Stacked expert weights [E/ep, ...] of a global [E, ...] tensor."""
    local = (global_shape[0] // ep.size,) + tuple(global_shape[1:])
    weight = nn.Parameter(torch.empty(local, device=device, dtype=dtype))
    weight.meta = ParamMeta(tuple(global_shape), REPLICATED, sequence_parallel, expert=True)
    return _Weight(weight)


class MoE(nn.Module):
    """The MoE MLP: [s(/tp), b, h] -> [s(/tp), b, h]."""

    def __init__(self, cfg: ModelConfig, layer_id: int, tp: Group, ep: Group, sequence_parallel: bool,
                 context: MoEContext, device=None, dtype=None, cp: Group | None = None):
        super().__init__()
        self.cfg, self.layer_id, self.tp, self.ep, self.sp, self.context = cfg, layer_id, tp, ep, sequence_parallel, context
        self.cp = cp if cp is not None else Group("cp", [0], 0)
        self.router = _Weight(make_param((cfg.moe_num_experts, cfg.hidden_size), REPLICATED, tp.size, device,
                                         dtype, sequence_parallel))
        self.experts = Experts(cfg, ep, sequence_parallel, device, dtype)
        self.shared = MLP(replace(cfg, mlp="swiglu", ffn_hidden_size=cfg.moe_shared_expert_size, bias=False),
                          tp, sequence_parallel, device, dtype) if cfg.moe_shared_expert_size else None
        # auxiliary-loss-free balancing (DeepSeek-V3): a per-expert selection bias, moved after each step
        # by update_router_biases from the step's token counts; a buffer, not trained, saved and resharded by
        # checkpoints (checkpoint/format.STATE_BUFFERS)
        self.register_buffer("selection_bias", torch.zeros(cfg.moe_num_experts, device=device, dtype=torch.float32)
                             if cfg.moe_router_bias_rate else None)

    def _whole_sequence(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """This rank's rows [N, k] -> the microbatch's [s*b, k], in one-process order (position-major)."""
        t = self.tp.all_gather(t.contiguous(), dim=0) if self.sp else t       # [s/cp * b, k]
        if self.cp.size == 1:
            return t
        pieces = self.cp.all_gather(t.contiguous(), dim=0).view(self.cp.size, -1, b, t.shape[-1])
        return zigzag_unshard(list(pieces), 0).reshape(-1, t.shape[-1])      # [s*b, k]

    def _own_rows(self, t: torch.Tensor, b: int, n_local: int) -> torch.Tensor:
        """The inverse selection: the microbatch's [s*b, k] -> this rank's [N, k]."""
        if self.cp.size > 1:
            t = zigzag_shard(t.view(-1, b, t.shape[-1]), 0, self.cp.size, self.cp.rank).reshape(-1, t.shape[-1])
        return t[self.tp.rank * n_local:(self.tp.rank + 1) * n_local] if self.sp else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, E = self.cfg, self.cfg.moe_num_experts
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)                                         # [N, h], N = s(/tp) * b
        n_local = tokens.shape[0]
        n_total = n_local * (self.tp.size if self.sp else 1) * self.cp.size  # T: the microbatch's tokens
        rdt = torch.promote_types(tokens.dtype, torch.float32)               # fp32 (fp64 stays fp64)
        logits = F.linear(tokens.to(rdt), self.router().to(rdt))             # [N, E]
        weights, experts, balance = route(logits, cfg, self.selection_bias)  # [N, k], [N, k], [N, E]

        counts = torch.bincount(experts.reshape(-1), minlength=E)            # [E] before drops
        if self.sp:
            counts = self.tp.all_reduce(counts.clone())
        if self.cp.size > 1:
            counts = self.cp.all_reduce(counts.clone())
        aux = logits.new_zeros(())
        lb = (counts.to(balance.dtype) * balance.sum(0)).sum() * (E / (cfg.moe_top_k * n_total ** 2))
        z = torch.logsumexp(logits, dim=-1).square().sum() / n_total
        if cfg.moe_aux_loss_coeff:
            aux = aux + cfg.moe_aux_loss_coeff * lb
        if cfg.moe_z_loss_coeff:
            aux = aux + cfg.moe_z_loss_coeff * z

        if cfg.moe_capacity_factor is not None and self.training:          # eval/generation: dropless
            with torch.no_grad():                                           # decided on the whole sequence
                keep = capacity_keep(self._whole_sequence(weights, b), self._whole_sequence(experts, b), E,
                                     cfg.moe_capacity_factor)
                keep = self._own_rows(keep, b, n_local)
        else:
            keep = torch.ones_like(experts, dtype=torch.bool)
        token_of = torch.arange(n_local, device=x.device).repeat_interleave(cfg.moe_top_k)   # [N*k]
        kept = keep.reshape(-1).nonzero().squeeze(-1)                        # [M] selections dispatched
        token_of, expert_of, weight = token_of[kept], experts.reshape(-1)[kept], weights.reshape(-1)[kept]
        plan = dispatch_plan(expert_of, E, self.ep)
        rows, local_counts = dispatch(tokens[token_of], plan)                # [R, h]
        out = combine(self.experts(rows, local_counts), weight, token_of, n_local, plan)
        out = out.view(s, b, h)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training and torch.is_grad_enabled():
            self.context.aux.append((self.layer_id, lb.detach(), z.detach()))
            if self.ep.size > 1:
                self.context.rows.append((self.layer_id, sum(plan.send), sum(plan.recv)))
            prev = self.context.load.get(self.layer_id)
            self.context.load[self.layer_id] = counts if prev is None else prev + counts
            out = attach_aux(out, aux, self.context.scale)
        return out


@torch.no_grad()
def update_router_biases(chunks, dp: Group) -> None:
    """After a step: each MoE layer with model.moe_router_bias_rate moves its selection bias by
    rate * sign(mean load - load of the expert), the loads being the step's selections summed over
    its microbatches and the dp group (an all-reduce of E int64 per layer), so every replica moves alike."""
    layers = [(c.moe, m) for c in chunks for m in c.modules()
              if isinstance(m, MoE) and m.selection_bias is not None]
    if not layers:
        return
    counts = torch.stack([ctx.load.get(m.layer_id, torch.zeros_like(m.selection_bias, dtype=torch.long))
                          for ctx, m in layers])                                        # [layers, E]
    counts = dp.all_reduce(counts.to(layers[0][1].selection_bias.device))
    for (_, m), c in zip(layers, counts.double()):
        m.selection_bias += m.cfg.moe_router_bias_rate * torch.sign(c.mean() - c).float()
