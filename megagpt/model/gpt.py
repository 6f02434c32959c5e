"""The GPT decoder. With every parallel degree at 1 it is a plain single-device PyTorch model.

A pipeline stage builds the same class with `layer_ids` (global layer numbers, so parameter
names are the same in every layout: `layers.12.mlp.fc1.weight`), `pre_process` (it owns the
embedding) and `post_process` (final norm, output layer and loss).
Activations are [s, b, h]; with sequence parallelism each TP rank holds [s/tp, b, h].
With model.image_token_id / audio_token_id set, the first stage also holds the multimodal adapters
(replicated over TP, their SP gradients summed over TP: multimodal/adapters.py), whose embeddings replace
the placeholder rows of the token embeddings (`media`, a spec.Media, through forward).
"""
from __future__ import annotations

import hashlib
from dataclasses import replace

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..parallel.context import zigzag_shard
from ..parallel.cross_entropy import vocab_parallel_cross_entropy
from ..parallel.layers import (REPLICATED, ColumnParallelLinear, VocabParallelEmbedding, init_std_for,
                               make_param, parallel_lm_logits)
from ..parallel.random import RNGTracker, checkpoint, dropout
from ..parallel.state import ParallelState
from ..multimodal.adapters import adapter_init_std, build_adapters, merge_media
from .block import Block
from .moe import MoEContext
from .norm import Norm
from .packing import Packing
from .rope import rope_tables
from .variants import workspace_index, workspace_slots


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
        if pre_process:   # the media adapters (multimodal/adapters.py), registered first: last in the grad buffer
            for name, adapter in build_adapters(cfg, self.sp, device, dtype).items():
                setattr(self, name, adapter)
        # The tied output layer reads the embedding; a last stage without the embedding keeps a copy,
        # whose gradient is summed with the first stage's (optim/finalize.py).
        if pre_process or (post_process and cfg.tie_embeddings):
            self.embedding = VocabParallelEmbedding(self.padded_vocab, h, tp, self.sp, **kw)
            if cfg.tie_embeddings:
                w = self.embedding.weight
                w.meta = replace(w.meta, tied="embedding", tied_copy=not pre_process)
        if pre_process and cfg.workspace_tokens:  # learned workspace vectors (model/variants.py); with SP each
            self.workspace = make_param((cfg.workspace_tokens, h), REPLICATED, 1, device, dtype, self.sp)  # TP rank
        self.moe = MoEContext()           # the aux losses' weight and the routing records (model/moe.py)
        self.layers = nn.ModuleDict({                                          # holds some slots: grads summed
            str(i): Block(cfg, tp, self.sp, tracker, recompute == "selective", cp=ps.cp, **kw, layer_id=i,
                          ep=ps.groups["ep"], moe_context=self.moe) for i in self.layer_ids})
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
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight") \
                    or name.endswith("attention.span"):                  # spans start at the whole context
                full = torch.ones(meta.global_shape)
            elif name.endswith("bias"):
                full = torch.zeros(meta.global_shape)
            else:
                digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
                std = adapter_init_std(name, meta.global_shape, cfg.init_std)   # None: not an adapter's
                std = init_std_for(name, cfg.init_std, cfg.num_layers, cfg.scaled_init) if std is None else std
                full = torch.empty(meta.global_shape).normal_(0.0, std, generator=gen)
            ep = self.ps.groups["ep"]
            p.copy_(meta.spec.shard(meta.ep_shard(full, ep.rank, ep.size), self.tp.rank, self.tp.size))

    # ------------------------------------------------------------------ forward
    def _rope(self, s: int, device, dtype):
        key = (s, device, dtype)
        if key not in self._rope_cache:
            cfg = self.cfg
            rot = int(cfg.head_dim * cfg.rotary_fraction)
            self._rope_cache = {key: rope_tables(s, rot, cfg.rope_theta, cfg.rope_scaling, device, dtype,
                                                   cfg.rope_scaling_type, cfg.rope_original_len)}
        return self._rope_cache[key]

    def embed(self, tokens: torch.Tensor, media=None) -> torch.Tensor:
        """tokens [b, s] -> [s(/tp), b, h]; media (a spec.Media) fill the placeholder rows."""
        x = self.embedding(tokens)
        if self.cfg.image_token_id is not None or self.cfg.audio_token_id is not None:
            x = merge_media(self, tokens, x, media)
        elif media is not None and media.placeholder_counts() != (0, 0):
            raise ValueError("media: this model has no adapters (model.image_token_id, model.audio_token_id unset)")
        if self.cfg.workspace_tokens:                                     # the workspace slots take their vectors
            m, s_all = self.cfg, tokens.shape[1] * self.ps.cp.size
            pos = self._local_positions(s_all, tokens.device)
            if self.sp:
                pos = pos.chunk(self.tp.size)[self.tp.rank]              # this TP rank's rows [s/tp]
            slots = workspace_slots(s_all, m.workspace_tokens, m.workspace_every, tokens.device)[pos]
            ws = self.workspace[workspace_index(s_all, m.workspace_tokens, m.workspace_every, tokens.device)[pos]]
            x = torch.where(slots[:, None, None], ws[:, None, :].to(x.dtype), x)
        return dropout(x, self.cfg.hidden_dropout, self.training, self.tracker, self.sp, self.ps.cp)

    def _local_positions(self, seq_len: int, device) -> torch.Tensor:
        """Global positions of this rank's rows: its zigzag pair under CP."""
        cp = self.ps.cp
        return zigzag_shard(torch.arange(seq_len, device=device), 0, cp.size, cp.rank)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, cache=None,
                packing: Packing | None = None, media=None) -> torch.Tensor:
        """x: tokens [b, s] on the first stage, else hidden [s(/tp), b, h] from the previous stage.
        Returns per-token losses [b, s] (fp32) when labels are given on the last stage, logits
        [s, b, V/tp] without labels on the last stage, and hidden [s(/tp), b, h] elsewhere.
        cache: a `KVCache` of this chunk's layers (generation): x holds the s tokens after the cached
        ones, RoPE takes each row's positions from the cache, which then advances by s.
        packing: samples packed in each row (model/packing.py): positions restart per sample and
        attention stays within it. Labels < 0 (IGNORE_INDEX) carry no loss: their per-token loss is 0.
        media: the microbatch's images and audio (multimodal/spec.Media), used by the first stage only."""
        x = self.trunk(x, cache, packing, media)
        if not self.post_process:
            return x
        return self.head(x, labels, cache)

    def trunk(self, x: torch.Tensor, cache=None, packing: Packing | None = None, media=None) -> torch.Tensor:
        """The embedding (first stage) and this chunk's layers: -> hidden [s(/tp), b, h]."""
        if self.pre_process:
            x = self.embed(x, media)
        s = x.shape[0] * (self.tp.size if self.sp else 1)
        if cache is not None:
            cos, sin = cache.rope(*self._rope(cache.max_len, x.device, torch.float32), s)  # [s, b, 1, rot/2]
        else:  # under CP this rank holds s of the cp*s positions: its zigzag rows of the whole table
            cp = self.ps.cp
            cos, sin = (zigzag_shard(t, 0, cp.size, cp.rank) for t in self._rope(s * cp.size, x.device, torch.float32))
        mask = None
        if packing is not None:
            if self.ps.cp.size > 1:
                raise ValueError("packed samples are not supported with parallel.cp > 1 (their positions and "
                                 "block-diagonal mask are not cut by the zigzag)")
            cos, sin = packing.rope(cos, sin)                                # [s, b, 1, rot/2]
            mask = packing.mask.to(x.device)                                 # [b, 1, s, s]
        for i, layer in self.layers.items():
            if cache is not None:
                x = layer(x, cos, sin, cache.layer(int(i)))
            elif int(i) in self.full_recompute_ids and self.training:
                x = checkpoint(layer, self.tracker, x, cos, sin, None, mask)
            else:
                x = layer(x, cos, sin, None, mask)
        if cache is not None:
            cache.advance(s)
        return x

    def head(self, x: torch.Tensor, labels: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Final norm and output layer of the last stage: logits, or per-token losses given labels."""
        if cache is not None and cache.last_only:
            x = x[-1:]                                                       # [1, b, h]: the slot to sample from
        x = self.final_norm(x)
        if self.cfg.tie_embeddings:
            logits = parallel_lm_logits(x, self.embedding.weight, self.tp, self.sp)   # [s, b, V/tp]
        else:  # the same matmul, called as a module so that its forward hooks run
            logits = self.lm_head(x)                                                  # [s, b, V/tp]
        if labels is None:
            return logits
        keep = labels >= 0                                                   # [b, s]
        loss = vocab_parallel_cross_entropy(logits, labels.clamp(min=0).t(), self.tp, self.cfg.vocab_size).t()
        loss = torch.where(keep, loss, torch.zeros_like(loss))               # [b, s]
        m = self.cfg
        if m.workspace_tokens:                                            # workspace slots carry no loss
            s_all = labels.shape[1] * self.ps.cp.size
            slots = workspace_slots(s_all, m.workspace_tokens, m.workspace_every, labels.device)
            loss = loss.masked_fill(slots[self._local_positions(s_all, labels.device)][None, :], 0.0)
        return loss

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[s, b, V/tp] -> [b, s, vocab] on every TP rank (for generation and tests; not for training)."""
        full = self.tp.all_gather(logits.contiguous(), dim=-1) if self.tp.size > 1 else logits
        return full[..., : self.cfg.vocab_size].transpose(0, 1)


def build_model(cfg: ModelConfig, ps: ParallelState | None = None, seed: int = 1234, model_cls=None,
                **kwargs) -> GPTModel:
    """model_cls: a GPTModel subclass with another head (align/reward.py's scalar head); default GPTModel."""
    model = (model_cls or GPTModel)(cfg, ps, **kwargs)
    model.init_weights(seed)
    return model
