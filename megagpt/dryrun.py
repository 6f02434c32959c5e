"""Dry run: build every pipeline stage of a layout on the meta device (no memory) and count.

The counts come from the real model classes, not from a formula, so they cannot drift from what
training allocates; tests check them against config.count_params and a materialised tiny model.
"""
from __future__ import annotations

import torch

from .config import Config, count_params, vocab_padding_note
from .model.gpt import GPTModel
from .parallel.state import ParallelState
from .pipeline.split import chunk_layers, stage_chunks  # noqa: F401  (stage_chunks re-exported)


def meta_rank_params(cfg: Config, tp_rank: int, pp_rank: int) -> int:
    p = cfg.parallel
    ps = ParallelState.virtual(tp=p.tp, pp=p.pp, tp_rank=tp_rank, pp_rank=pp_rank)
    total = 0
    for layer_ids, pre, post in stage_chunks(cfg, pp_rank):
        with torch.device("meta"):
            chunk = GPTModel(cfg.model, ps, sequence_parallel=p.sequence_parallel, layer_ids=layer_ids,
                             pre_process=pre, post_process=post, device="meta")
        total += sum(t.numel() for t in chunk.parameters())
    return total


def dry_run(cfg: Config, world_size: int) -> dict:
    p = cfg.parallel
    dp = world_size // (p.tp * p.pp)
    per_stage = [meta_rank_params(cfg, 0, r) for r in range(p.pp)]
    m = cfg.model
    padding_rows = m.padded_vocab(p.tp) - m.vocab_size
    padded_total = count_params(m) + padding_rows * m.hidden_size * (1 if m.tie_embeddings else 2)
    out = {
        "config": {"layers": cfg.model.num_layers, "hidden": cfg.model.hidden_size, "heads": cfg.model.num_heads,
                   "kv_heads": cfg.model.kv_heads, "ffn": cfg.model.ffn_hidden_size, "vocab": cfg.model.vocab_size},
        "layout": {"tp": p.tp, "pp": p.pp, "vp": p.vp, "dp": dp, "world_size": world_size,
                   "sequence_parallel": p.sequence_parallel},
        "params_total": count_params(cfg.model),
        "params_total_padded": padded_total,
        "params_per_rank": per_stage,
        "params_per_rank_note": "one entry per pipeline stage; every TP and DP rank of a stage holds the same count",
        "vocab_padding": vocab_padding_note(cfg.model, p.tp),
        "split": [ids for r in range(p.pp) for ids, _, _ in stage_chunks(cfg, r)],
    }
    try:  # the analytic memory model (weights, grads, optimizer, activations) for the most loaded rank
        from .memory import memory_per_rank
        t = cfg.train
        out["bytes_per_rank"] = memory_per_rank(
            cfg.model, tp=p.tp, pp=p.pp, vp=p.vp, dp=dp, seq_len=t.seq_len, micro_batch=t.micro_batch_size,
            num_microbatches=t.global_batch_size // (t.micro_batch_size * dp), dtype=t.dtype,
            distributed_optimizer=p.distributed_optimizer, sequence_parallel=p.sequence_parallel,
            recompute=t.recompute, recompute_num_layers=t.recompute_num_layers,
            # the split the model is really built with (balanced for the LM head), not an even one
            layers_per_stage=[len(ids) for ids in chunk_layers(cfg)])
    except ImportError:
        pass
    return out
