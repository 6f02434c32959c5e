"""Causal self-attention: MHA, GQA and MQA through num_kv_heads, with TP over heads.

The fused QKV weight's global layout is [Q (nq*d rows); K (nkv*d); V (nkv*d)], the layout of HF's
q_proj/k_proj/v_proj stacked. TP rank r holds [Q_r; K_r; V_r]: whole query heads, and the KV heads
those queries use (split when nkv % tp == 0, replicated over tp/nkv ranks when nkv < tp).
The core runs through flash-attn when it imports on CUDA, else F.scaled_dot_product_attention;
under context parallelism (a CP group of more than one rank) through ring attention
(parallel/context.py), each rank holding its zigzag pair of sequence chunks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel.context import band_mask, ring_attention
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, ShardSpec, make_param
from ..parallel.random import TP_SHARDED, RNGTracker, checkpoint
from ..parallel.state import Group
from .rope import apply_rope
from .variants import SpanPenalty, adaptive_span_attention, allgather_attention, blocked_attention, cp_method


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
        return flash_attn_func
    except ImportError:
        return None


def core_attention(q, k, v, dropout_p: float, use_flash: bool, window: int | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, s, nq, d], k/v [b, s, nkv, d] -> [b, s, nq, d], causal; with a sliding window each query
    sees the `window` keys ending at its own position (`band_mask`); under `mask` [b, 1, s, s] (True =
    attend; packed samples: block-diagonal causal, model/packing.py) through SDPA, ANDed with the band."""
    if mask is not None:
        if window is not None:
            pos = torch.arange(q.shape[1], device=q.device)
            mask = mask & band_mask(pos, pos, window)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             dropout_p=dropout_p, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    if use_flash and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q, k, v, dropout_p=dropout_p, causal=True,
                         window_size=(-1, -1) if window is None else (window - 1, 0))
    mask = None
    if window is not None:
        pos = torch.arange(q.shape[1], device=q.device)
        mask = band_mask(pos, pos, window)                        # [s, s]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, is_causal=mask is None,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def masked_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Inference core over a KV cache: q [b, s, nq, d], k/v [b, T, nkv, d], mask [b, 1, s, T] (True = attend),
    or None when no row is padded and either s = 1 (every key is visible) or T = s (plain causal) -> [b, s, nq, d]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=mask is None and q.shape[1] > 1,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: Group, sequence_parallel: bool, tracker: RNGTracker | None,
                 selective_recompute: bool = False, device=None, dtype=None, cp: Group | None = None):
        super().__init__()
        self.cp = cp if cp is not None and cp.size > 1 else None
        h, d, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.kv_heads
        self.head_dim, self.tracker, self.cfg = d, tracker, cfg
        self.nq_local = nq // tp.size
        self.nkv_local = nkv // tp.size if nkv % tp.size == 0 else 1
        self.selective_recompute = selective_recompute
        spec = ShardSpec(0, ((nq * d, 0), (nkv * d, nkv), (nkv * d, nkv)))
        self.qkv = ColumnParallelLinear(h, (nq + 2 * nkv) * d, tp, sequence_parallel, spec, cfg.bias, device, dtype)
        self.proj = RowParallelLinear(nq * d, h, tp, sequence_parallel, cfg.bias, device, dtype)
        if cfg.adaptive_span:                                    # one span per head, split with the heads
            self.span = make_param((nq,), ShardSpec(0, ((nq, 0),)), tp.size, device, dtype)
            self.span_grad_weight = 1.0 / (cp.size if cp is not None else 1)   # a forward's share of the penalty:
            # its tokens over the loss's (this rank's s/cp of a sequence); the trainer sets it (variants.py)

    def _core(self, q, k, v, mask=None):
        w, m = self.cfg.attention_window, self.cfg
        if mask is not None and (m.adaptive_span or m.workspace_tokens or self.cp is not None):
            raise ValueError("packed samples (a block-diagonal mask) are not supported with parallel.cp > 1, "
                             "workspace tokens or adaptive span")
        if m.adaptive_span:                                      # under CP: the all-gather method
            return adaptive_span_attention(q, k, v, self.span, m.span_ramp, m.max_seq_len, self.cp)
        if self.cp is not None:                                  # dropout > 0 is refused with cp > 1 (layout.py)
            if cp_method(m) == "allgather":
                return allgather_attention(q, k, v, self.cp, m, q.shape[1] * self.cp.size)
            return ring_attention(q, k, v, self.cp, window=w)
        p = self.cfg.attention_dropout if self.training else 0.0
        flash = (self.cfg.use_flash_attn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                 and _flash_attn_func() is not None)
        if m.workspace_tokens or (w is not None and mask is None and p == 0 and not flash):
            # the workspace mask, or a window without flash-attn: block-sparse, so neither the FLOPs nor the
            # saved tensors grow as s^2 (SDPA with the band as a dense mask computes every score and keeps
            # the [s, s] mask for backward)
            return blocked_attention(q, k, v, m)
        if p > 0 and self.tracker is not None:
            with self.tracker.fork(TP_SHARDED):                  # heads are sharded over TP
                return core_attention(q, k, v, p, self.cfg.use_flash_attn, w, mask)
        return core_attention(q, k, v, p, self.cfg.use_flash_attn, w, mask)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
        """cache: None in training; in generation this layer's view of a `KVCache` (megagpt/kv_cache.py),
        which stores this rank's KV heads and returns them with the mask over padding and the future.
        mask: None (causal) or [b, 1, s, s] of packed samples (training; True = attend)."""
        qkv = self.qkv(x)                                         # [s, b, (nq_l + 2 nkv_l) d]
        s, b, _ = qkv.shape
        d = self.head_dim
        q, k, v = qkv.split([self.nq_local * d, self.nkv_local * d, self.nkv_local * d], dim=-1)
        q = apply_rope(q.view(s, b, self.nq_local, d), cos, sin, self.cfg.rope_interleaved)
        k = apply_rope(k.view(s, b, self.nkv_local, d), cos, sin, self.cfg.rope_interleaved)
        v = v.view(s, b, self.nkv_local, d)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))          # [b, s, heads, d]
        if cache is not None:
            if self.cfg.workspace_tokens or self.cfg.adaptive_span:
                raise ValueError("generation: workspace tokens and adaptive span have no KV-cache path yet")
            k, v = cache.update(k, v)                             # [b, T, nkv_l, d], T = cached + s
            mask, w = cache.mask, self.cfg.attention_window
            if w is not None:                                     # the window over cache slots: the s queries
                T = k.shape[1]                                    # sit in the last s of T slots
                band = band_mask(torch.arange(T - s, T, device=k.device), torch.arange(T, device=k.device), w)
                mask = band if mask is None else mask & band      # [s, T] or [b, 1, s, T]
            out = masked_attention(q, k, v, mask)
        elif self.selective_recompute and self.training:
            out = checkpoint(self._core, self.tracker, q, k, v, mask)  # keep q, k, v; recompute the core
        else:
            out = self._core(q, k, v, mask)
        if self.cfg.adaptive_span and self.training and self.cfg.span_penalty:
            out = SpanPenalty.apply(out, self.span, self.cfg.span_penalty, self.cfg.num_heads, self.cfg.max_seq_len,
                                    self.span_grad_weight)
        out = out.transpose(0, 1).reshape(s, b, self.nq_local * d)  # [s, b, nq_l d]
        return self.proj(out)                                     # [s(/tp), b, h]
