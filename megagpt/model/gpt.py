"""The GPT decoder. With every parallel degree at 1 it is a plain single-device PyTorch model.

A pipeline stage builds the same class with `layer_ids` (global layer numbers, so parameter
names are the same in every layout: `layers.12.mlp.fc1.weight`), `pre_process` (it owns the
embedding) and `post_process` (final norm, output layer and loss).
Activations are [s, b, h]; with sequence parallelism each TP rank holds [s/tp, b, h].
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..parallel.context import zigzag_shard
from ..parallel.cross_entropy import vocab_parallel_cross_entropy
from ..parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding, init_std_for,
                               parallel_lm_logits)
from ..parallel.random import RNGTracker, checkpoint, dropout
from ..parallel.state import ParallelState
from .block import Block
from .norm import Norm
from .rope import rope_tables


class GPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState | None = None, *, sequence_parallel: bool = False,
                 layer_ids: list[int] | None = None, pre_process: bool = True, post_process: bool = True,
                 recompute: str = "none", recompute_num_layers: int | None = None,
                 tracker: RNGTracker | None = None, device=None, dtype=torch.float32):
        super().__init__()
        ps = ps or ParallelState.single()
        tp = ps.tp
        self.cfg, self.ps, self.tp, self.sp, self.tracker = cfg, ps, tp, sequence_parallel and tp.size > 1, tracker
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_ids = list(range(cfg.num_layers)) if layer_ids is None else list(layer_ids)
        self.padded_vocab = cfg.padded_vocab(tp.size)
        self.recompute = recompute
        n_full = len(self.layer_ids) if recompute_num_layers is None else recompute_num_layers
        self.full_recompute_ids = set(self.layer_ids[:n_full]) if recompute == "full" else set()
        h = cfg.hidden_size
        kw = dict(device=device, dtype=dtype)
        # The tied output layer reads the embedding; a last stage without the embedding keeps a copy,
        # whose gradient is summed with the first stage's (optim/finalize.py).
        if pre_process or (post_process and cfg.tie_embeddings):
            self.embedding = VocabParallelEmbedding(self.padded_vocab, h, tp, self.sp, **kw)
            if cfg.tie_embeddings:
                w = self.embedding.weight
                w.meta = replace(w.meta, tied="embedding", tied_copy=not pre_process)
        self.layers = nn.ModuleDict({
            str(i): Block(cfg, tp, self.sp, tracker, recompute == "selective", cp=ps.cp, **kw) for i in self.layer_ids})
        if post_process:
            self.final_norm = Norm(h, cfg.norm, cfg.norm_eps, self.sp, **kw)
            if not cfg.tie_embeddings:
                self.lm_head = ColumnParallelLinear(h, self.padded_vocab, tp, self.sp, **kw)
        self._rope_cache: dict = {}

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Each parameter is drawn whole from a generator seeded by (seed, its global name), then
        sharded: the weights are the same in every layout, so layouts can be compared exactly."""
        cfg = self.cfg
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            meta = p.meta
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
                full = torch.ones(meta.global_shape)
            elif name.endswith("bias"):
                full = torch.zeros(meta.global_shape)
            else:
                digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
                std = init_std_for(name, cfg.init_std, cfg.num_layers, cfg.scaled_init)
                full = torch.empty(meta.global_shape).normal_(0.0, std, generator=gen)
            p.copy_(meta.spec.shard(full, self.tp.rank, self.tp.size))

    # ------------------------------------------------------------------ forward
    def _rope(self, s: int, device, dtype):
        key = (s, device, dtype)
        if key not in self._rope_cache:
            cfg = self.cfg
            rot = int(cfg.head_dim * cfg.rotary_fraction)
            self._rope_cache = {key: rope_tables(s, rot, cfg.rope_theta, cfg.rope_scaling, device, dtype,
                                                   cfg.rope_scaling_type, cfg.rope_original_len)}
        return self._rope_cache[key]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> [s(/tp), b, h]."""
        x = self.embedding(tokens)
        return dropout(x, self.cfg.hidden_dropout, self.training, self.tracker, self.sp, self.ps.cp)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x: tokens [b, s] on the first stage, else hidden [s(/tp), b, h] from the previous stage.
        Returns per-token losses [b, s] (fp32) when labels are given on the last stage, logits
        [s, b, V/tp] without labels on the last stage, and hidden [s(/tp), b, h] elsewhere.
        cache: a `KVCache` of this chunk's layers (generation): x holds the s tokens after the cached
        ones, RoPE takes each row's positions from the cache, which then advances by s."""
        if self.pre_process:
            x = self.embed(x)
        s = x.shape[0] * (self.tp.size if self.sp else 1)
        if cache is not None:
            cos, sin = cache.rope(*self._rope(cache.max_len, x.device, torch.float32), s)  # [s, b, 1, rot/2]
        else:  # under CP this rank holds s of the cp*s positions: its zigzag rows of the whole table
            cp = self.ps.cp
            cos, sin = (zigzag_shard(t, 0, cp.size, cp.rank) for t in self._rope(s * cp.size, x.device, torch.float32))
        for i, layer in self.layers.items():
            if cache is not None:
                x = layer(x, cos, sin, cache.layer(int(i)))
            elif int(i) in self.full_recompute_ids and self.training:
                x = checkpoint(layer, self.tracker, x, cos, sin)
            else:
                x = layer(x, cos, sin)
        if cache is not None:
            cache.advance(s)
        if not self.post_process:
            return x
        if cache is not None and cache.last_only:
            x = x[-1:]                                                       # [1, b, h]: the slot to sample from
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = parallel_lm_logits(x, self.embedding.weight, self.tp, self.sp)   # [s, b, V/tp]
        else:  # the same matmul, called as a module so that its forward hooks run
            logits = self.lm_head(x)                                                  # [s, b, V/tp]
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels.t(), self.tp, self.cfg.vocab_size).t()  # [b, s]

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[s, b, V/tp] -> [b, s, vocab] on every TP rank (for generation and tests; not for training)."""
        full = self.tp.all_gather(logits.contiguous(), dim=-1) if self.tp.size > 1 else logits
        return full[..., : self.cfg.vocab_size].transpose(0, 1)


def build_model(cfg: ModelConfig, ps: ParallelState | None = None, seed: int = 1234, **kwargs) -> GPTModel:
    model = GPTModel(cfg, ps, **kwargs)
    model.init_weights(seed)
    return model
