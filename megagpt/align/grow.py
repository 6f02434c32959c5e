"""Load a pretrained checkpoint into a model whose vocab grew (chat tokens added to its tokenizer).

Every parameter is read with this model's global shape and resharded to this rank, as `load_checkpoint`
does; the checkpoint's vocab rows of the embedding (and an untied LM head) are kept and the new rows
[saved vocab, new vocab) start as the mean of the saved rows (a neutral start: the new tokens'
logits begin at the average logit). Padding rows beyond the new vocab are zero. Whatever the saved
TP degree and padding, the result equals growing the one-process model and then sharding it.
"""
from __future__ import annotations

import torch

from dataclasses import replace

from ..checkpoint.format import VOCAB_PADDED, Reader, rank_params
from ..checkpoint.store import CheckpointError, find_checkpoint
from ..parallel.layers import ShardSpec, meta_of


@torch.no_grad()
def load_grown(path: str, chunks, ps, model_cfg, verify: bool = True, new_params: tuple = ()) -> int:
    """Load `path` into `chunks`; returns the checkpoint's vocab size. A checkpoint of another
    architecture, or with a larger vocab than this model's, is a one-line CheckpointError.
    new_params: names this model adds (the reward head), kept as initialised when the checkpoint lacks them."""
    with Reader(find_checkpoint(path), verify) as reader:
        saved = reader.metas[0].model_config
        saved_vocab = int(saved["vocab_size"])
        if saved_vocab > model_cfg.vocab_size:
            raise CheckpointError(f"model.vocab_size: the checkpoint in {reader.dir} has {saved_vocab} tokens, more than "
                                  f"this model's {model_cfg.vocab_size}")
        reader.check_config(replace(model_cfg, vocab_size=saved_vocab))     # every other architecture field must match
        # this model's params only: the checkpoint's LM head is not read into the reward model
        for name, p, _ in rank_params(chunks):
            shape, spec = tuple(meta_of(p).global_shape), meta_of(p).spec
            if name in new_params and name not in reader.params:
                continue
            if name in VOCAB_PADDED and saved_vocab < model_cfg.vocab_size:
                full = reader.read_param(name, shape, ShardSpec(), 0, 1).to(p.dtype)   # [V_pad, h], new rows 0
                full[saved_vocab:model_cfg.vocab_size] = full[:saved_vocab].float().mean(0).to(p.dtype)
                full[model_cfg.vocab_size:] = 0          # the checkpoint's own padding when its padded shape is ours
                p.copy_(spec.shard(full, ps.tp.rank, ps.tp.size))
            else:
                p.copy_(reader.read_param(name, shape, spec, ps.tp.rank, ps.tp.size))
    return saved_vocab

