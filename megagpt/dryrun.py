"""Dry run: build every pipeline stage of a layout on the meta device (no memory) and count.

The counts come from the real model classes (`split.meta_stage`, the builder training uses), not
from a formula, so they cannot drift from what training allocates; tests check them against the
analytic memory model (which the planner uses), model_size.count_params and a materialised tiny model.
"""
from __future__ import annotations

from .config import Config, dp_mode, vocab_padding_note
from .model_size import active_params, count_params
from .layout import Layout
from .memory import memory_per_rank
from .pipeline.split import meta_stage, stage_chunks  # noqa: F401  (stage_chunks re-exported)


def meta_rank_params(cfg: Config, tp_rank: int, pp_rank: int) -> int:
    """Parameters the rank at (tp_rank, pp_rank) holds, counted on its meta-device chunks."""
    return sum(t.numel() for chunk in meta_stage(cfg, tp_rank, pp_rank) for t in chunk.parameters())


def dry_run(cfg: Config, world_size: int) -> dict:
    p, m, t = cfg.parallel, cfg.model, cfg.train
    layout = Layout.from_config(cfg, world_size)
    per_stage = [meta_rank_params(cfg, 0, r) for r in range(p.pp)]
    padding_rows = m.padded_vocab(p.tp) - m.vocab_size
    padded_total = count_params(m) + padding_rows * m.hidden_size * (1 if m.tie_embeddings else 2)
    return {
        "config": {"layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_heads,
                   "kv_heads": m.kv_heads, "ffn": m.ffn_hidden_size, "vocab": m.vocab_size},
        "layout": {"tp": p.tp, "cp": p.cp, "pp": p.pp, "vp": p.vp, "dp": layout.dp, "ep": layout.ep,
                   "world_size": world_size,
                   "sequence_parallel": layout.sp, "num_microbatches": layout.num_microbatches},
        "params_total": count_params(m),
        "params_active": active_params(m),         # per token: top_k of the E experts of a MoE layer
        "params_total_padded": padded_total,
        "params_per_rank": per_stage,
        "params_per_rank_note": "one entry per pipeline stage; every TP and DP rank of a stage holds the same count",
        "vocab_padding": vocab_padding_note(m, p.tp),
        "split": [ids for r in range(p.pp) for ids, _, _ in layout.stage_chunks(m, r)],
        # the analytic memory model (weights, grads, optimizer, activations) of the most loaded rank
        "bytes_per_rank": memory_per_rank(m, layout, dtype=t.dtype, distributed_optimizer=p.distributed_optimizer,
                                          recompute=t.recompute, recompute_num_layers=t.recompute_num_layers,
                                          dp_mode=dp_mode(t, p)),
    }
