"""Mixture of depths (Raposo et al. 2024): on the layers in model.mod_layers, a router picks the top
fraction (model.mod_capacity, e.g. 12.5%) of each sequence's tokens; only those run through the
block, the rest ride the residual stream unchanged.

    r = x w_r (fp32)                          [s, b]: one score per token
    keep = top-k of r along s, per sequence   k = ceil(capacity * s), then sorted by position
    out[keep] = x[keep] + sigmoid(r[keep]) * (block(x[keep]) - x[keep]);  out[rest] = x[rest]

The selected tokens keep their order and their positions (RoPE is read at their original positions),
so attention among them is causal. The block's update is scaled by the router's weight, so the
router learns through the language-model loss (a sigmoid: at init the block's update is halved
rather than vanishing, as a raw score near 0 would make it).

Causality: the top-k is taken over the whole sequence, so whether token t is processed depends on
later tokens. Training is exact, but autoregressive generation cannot take the same decision: as in
the paper, a small causal predictor decides instead. `predictor` is that classifier (a linear probe
on the detached input, trained by binary cross-entropy against the top-k choice, its loss attached
to the gradient like the MoE aux losses, so it never changes the model). At generation (`causal`:
every KV-cache step, and a full recompute with MoEContext.causal_routing set) token t is processed
iff its predictor logit > 0, which reads x_t only; the layer then runs on every token with the keys
of the unprocessed ones hidden (kv_cache.py `routed`), so each processed token attends to the
processed tokens before it, as in training, and the others keep x. The cached decode and the full
recompute thus take the same decisions and give the same tokens. The fraction processed is whatever
the predictor picks (no top-k). Sequence parallelism and context parallelism are refused (the top-k
needs the whole sequence on each rank).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.layers import REPLICATED, make_param
from .moe import MoEContext, attach_aux


def mod_keep(scores: torch.Tensor, capacity: float) -> torch.Tensor:
    """scores [s, b] -> positions [k, b] of the top-k per sequence, ascending (k = ceil(capacity * s))."""
    k = max(1, math.ceil(capacity * scores.shape[0]))
    return torch.topk(scores, k, dim=0).indices.sort(dim=0).values


def processed_keys_mask(processed: torch.Tensor, s: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """Generation's attention rule for a MoD layer: the mask [b, 1, s, T] of the last s of T slots when only
    the keys of processed tokens (`processed` [b, T] bool) are visible, on top of `base` ([b|1, 1, s, T];
    None: causal). A query always sees itself, which keeps its softmax finite (its output is discarded)."""
    T = processed.shape[1]
    keys = torch.arange(T, device=processed.device)
    slots = torch.arange(T - s, T, device=processed.device)
    if base is None:
        base = (keys[None, :] <= slots[:, None])[None, None]                        # [1, 1, s, T]
    return base & (processed[:, None, None, :] | (keys[None, :] == slots[:, None]))


class MoDRouter(nn.Module):
    def __init__(self, hidden: int, capacity: float, layer_id: int, context: MoEContext, device=None, dtype=None):
        super().__init__()
        self.capacity, self.layer_id, self.context = capacity, layer_id, context
        self.weight = make_param((1, hidden), REPLICATED, 1, device, dtype)          # the router
        self.predictor = make_param((1, hidden), REPLICATED, 1, device, dtype)       # its causal stand-in

    def _scores(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> [s, b] fp32 (fp64 stays fp64) logits of a per-token linear probe."""
        rdt = torch.promote_types(x.dtype, torch.float32)
        return F.linear(x.to(rdt), weight.to(rdt)).squeeze(-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, body) -> torch.Tensor:
        """Training's rule (top-k per sequence). x [s, b, h]; body(x, cos, sin) is the block on a
        (sub)sequence. Returns [s, b, h]."""
        scores = self._scores(x, self.weight)                                        # [s, b]
        keep = mod_keep(scores.detach(), self.capacity)                              # [k, b]
        out = self.run_kept(x, keep, scores, cos, sin, body)
        if self.training and torch.is_grad_enabled():
            target = torch.zeros_like(scores).scatter(0, keep, 1.0)                 # [s, b]
            guess = self._scores(x.detach(), self.predictor)
            bce = F.binary_cross_entropy_with_logits(guess, target)
            self.context.mod.append((self.layer_id, bce.detach(), ((guess > 0) == (target > 0)).float().mean()))
            out = attach_aux(out, bce, self.context.scale)
        return out

    def run_kept(self, x, keep, scores, cos, sin, body) -> torch.Tensor:
        """The block on the kept positions keep [k, b] (ascending) of x [s, b, h] only -> [s, b, h]."""
        h = x.shape[-1]
        rows = keep.unsqueeze(-1).expand(-1, -1, h)
        x_sel = x.gather(0, rows)                                                    # [k, b, h]
        # RoPE at the kept tokens' own positions: tables [s, 1, 1, r] -> [k, b, 1, r]
        cos_sel, sin_sel = cos.squeeze(1).squeeze(1)[keep].unsqueeze(2), sin.squeeze(1).squeeze(1)[keep].unsqueeze(2)
        gate = torch.sigmoid(scores.gather(0, keep)).unsqueeze(-1).to(x.dtype)      # [k, b, 1]
        y_sel = x_sel + gate * (body(x_sel, cos_sel, sin_sel) - x_sel)
        return x.scatter(0, rows, y_sel)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [s, b] bool: generation's routing, each token by its own predictor logit."""
        return self._scores(x, self.predictor) > 0

    def causal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, body, cache=None) -> torch.Tensor:
        """Generation's rule (module docstring). body(x, cos, sin, cache, mask) is the block; cache this
        layer's KV-cache view or None (full recompute). x [s, b, h] -> [s, b, h]."""
        keep = self.predict(x)                                                       # [s, b]
        if cache is not None:
            y = body(x, cos, sin, cache.routed(keep.t()), None)
        else:   # full recompute: causal, and only processed keys: [b, 1, s, s]
            y = body(x, cos, sin, None, processed_keys_mask(keep.t(), x.shape[0]))
        gate = torch.sigmoid(self._scores(x, self.weight)).unsqueeze(-1).to(x.dtype)   # [s, b, 1]
        return torch.where(keep.unsqueeze(-1), x + gate * (y - x), x)
