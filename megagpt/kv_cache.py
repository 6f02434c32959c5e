"""The KV cache of one model chunk for generation: keys and values of every layer the chunk holds.

Each pipeline stage builds one for its own chunk, so it holds only its layers; with TP it holds this
rank's KV heads only (`Attention.nkv_local`: with GQA the KV heads, not the query heads).
Prompts of different lengths are left-padded to one length P: row i has `pad[i]` pad slots first,
and its token in slot t sits at position t - pad[i], so RoPE sees the positions the row would have
alone. The mask hides the pad slots (and the future) from every real query; a pad query attends only
to itself, which keeps its softmax finite, and no real token ever reads it.

The model reads it like a single-device model: `GPTModel.forward(x, cache=cache)` takes each row's
RoPE angles from `rope`, gives each layer `layer(i)`, whose `update` stores the new keys and values
and returns all of them with the step's `mask`, and calls `advance` after its layers. With `last_only` the last stage computes the
logits of the last slot only (what generation samples from; a prefill then skips P-1 rows of the LM head).
"""
from __future__ import annotations

import torch

from .model.mod import processed_keys_mask


class _LayerView:
    """One layer's slice of the cache, as Attention sees it."""

    def __init__(self, cache: "KVCache", layer_id: int):
        self.cache, self.layer_id = cache, layer_id

    @property
    def mask(self) -> torch.Tensor:
        return self.cache.mask

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [b, s, nkv_l, d] of the new tokens -> the layer's keys/values so far [b, length + s, nkv_l, d]."""
        c = self.cache
        start, end = c.length, c.length + k.shape[1]
        c.k[self.layer_id][:, start:end] = k
        c.v[self.layer_id][:, start:end] = v
        return c.k[self.layer_id][:, :end], c.v[self.layer_id][:, :end]

    def routed(self, keep: torch.Tensor) -> "_RoutedView":
        """Mixture of depths at generation (model/mod.py): keep [b, s] marks the step's tokens this layer
        processes. Every token's keys are stored, but those of unprocessed tokens are hidden from all
        queries of the layer (a query still sees itself, which keeps its softmax finite; its output is
        discarded), so the processed tokens attend among themselves, as in training."""
        c = self.cache
        route = c.route.setdefault(self.layer_id, torch.zeros(c.batch, c.max_len, dtype=torch.bool, device=keep.device))
        route[:, c.length:c.length + keep.shape[1]] = keep
        return _RoutedView(self, route[:, :c.length + keep.shape[1]], keep.shape[1])


class _RoutedView:
    """A layer view whose mask also hides the keys of tokens the layer did not process."""

    def __init__(self, view: _LayerView, keys: torch.Tensor, s: int):
        self.view, self.keys, self.s = view, keys, s          # keys [b, T]: processed, per slot so far

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view.update(k, v)

    @property
    def mask(self) -> torch.Tensor:
        return processed_keys_mask(self.keys, self.s, self.view.mask)                 # [b, 1, s, T]


class KVCache:
    """Keys/values [b, max_len, nkv_local, head_dim] per layer of `chunk`, with per-row left padding."""

    def __init__(self, chunk, batch: int, max_len: int, pad: torch.Tensor | None = None, dtype=None, device=None):
        if getattr(chunk, "sp", False):
            raise ValueError("generation: build the model with sequence_parallel off (a decode step has one token)")
        if max_len > chunk.cfg.max_seq_len:
            raise ValueError(f"generation: {max_len} positions exceed model.max_seq_len={chunk.cfg.max_seq_len}")
        p = next(chunk.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.padded = bool(self.pad.any())
        self.last_only = False              # True: the model computes logits of the last slot only (generation)
        self.k, self.v = {}, {}
        self.route = {}                     # layer id -> [b, max_len] bool: the tokens a MoD layer processed
        for i, layer in chunk.layers.items():
            att = layer.attention
            shape = (batch, max_len, att.nkv_local, att.head_dim)
            self.k[int(i)] = torch.zeros(shape, dtype=dtype, device=device)
            self.v[int(i)] = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = None

    # -- what the model calls
    def rope(self, cos: torch.Tensor, sin: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables [max_len, 1, 1, r] -> each row's angles for the next s slots [s, b, 1, r]; also builds
        the step's mask [b, 1, s, length + s] (every layer of the step shares it)."""
        if self.length + s > self.max_len:
            raise ValueError(f"generation: {self.length + s} positions exceed the cache's {self.max_len}")
        slots = torch.arange(self.length, self.length + s, device=self.pad.device)         # [s]
        pos = (slots[None, :] - self.pad[:, None]).clamp(min=0)                             # [b, s]
        if not self.padded and (s == 1 or self.length == 0):
            self.mask = None                                  # all keys visible, or plain causal: SDPA's fast paths
        else:
            keys = torch.arange(self.length + s, device=self.pad.device)                    # [T]
            real = (keys[None, None, :] >= self.pad[:, None, None]) & (keys[None, None, :] <= slots[None, :, None])
            self.mask = (real | (keys[None, None, :] == slots[None, :, None]))[:, None]     # [b, 1, s, T]
        return cos[pos.t(), 0], sin[pos.t(), 0]                                             # [s, b, 1, r]

    def layer(self, layer_id: int) -> _LayerView:
        if layer_id not in self.k:
            raise KeyError(f"KV cache: layer {layer_id} is not in this chunk's cache ({sorted(self.k)})")
        return _LayerView(self, layer_id)

    def advance(self, s: int) -> None:
        self.length += s

    # -- what the generator calls
    def repeat(self, n: int) -> "KVCache":
        """A cache for n samples of each row (row-major: row i's copies are rows i*n .. i*n+n-1), holding
        the prefilled prompt: the prompt is run once and its keys/values serve all n continuations."""
        out = KVCache.__new__(KVCache)
        out.batch, out.max_len, out.length, out.mask = self.batch * n, self.max_len, self.length, None
        out.pad, out.padded, out.last_only = self.pad.repeat_interleave(n), self.padded, self.last_only
        out.k = {i: t.repeat_interleave(n, dim=0) for i, t in self.k.items()}
        out.v = {i: t.repeat_interleave(n, dim=0) for i, t in self.v.items()}
        out.route = {i: t.repeat_interleave(n, dim=0) for i, t in self.route.items()}
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())
