"""Which layers each pipeline chunk holds, and building this rank's chunks.

The model is cut into pp*vp chunks of consecutive layers by `layout.Layout.chunk_layers` (the
balanced rule, which counts the LM head; see layout.py). Global chunk c lives on pp rank c % pp
as local chunk c // pp (the layout of `schedule.py`), so local chunk k of rank r is global chunk
k*pp + r. Chunk 0 also holds the embedding; the last chunk holds the final norm and the LM head
(or, with tied embeddings and pp > 1, its own copy of the embedding).

`build_stage` is the one chunk builder: on a real ParallelState it allocates and initialises
this rank's chunks; on `ParallelState.virtual` (`meta_stage`) it builds them on the meta device,
which is how the dry run, the converter and the tests count what a rank holds.
"""
from __future__ import annotations

import torch

from ..config import Config, ConfigError
from ..layout import Layout
from ..model.gpt import GPTModel, build_model
from ..parallel.state import ParallelState


# ----------------------------------------------------------------------------- the split (layout.py's rule)

def chunk_layers(cfg: Config) -> list[list[int]]:
    """Global layer ids of each of the pp*vp global chunks, in order (ConfigError for a bad layout)."""
    return Layout.from_config(cfg).chunk_layers(cfg.model)


def stage_chunks(cfg: Config, pp_rank: int) -> list[tuple[list[int], bool, bool]]:
    """(layer ids, pre_process, post_process) of each local chunk of pipeline rank pp_rank."""
    return Layout.from_config(cfg).stage_chunks(cfg.model, pp_rank)


def describe_split(cfg: Config) -> str:
    """The split as printed at start-up: one line per global chunk, with its cost in layers."""
    p, layout = cfg.parallel, Layout.from_config(cfg)
    layers, chunks = layout.chunk_layers(cfg.model), p.pp * p.vp
    head = layout.head_cost(cfg.model)
    how = "explicit parallel.layers_per_stage" if p.layers_per_stage is not None else "balanced"
    lines = [f"pipeline split ({how}): {cfg.model.num_layers} layers in pp*vp={p.pp}*{p.vp}={chunks} chunks; "
             f"cost in layer-equivalents of FLOPs, LM head = {head:.2f}"]
    for c, ids in enumerate(layers):
        span = f"layers {ids[0]}-{ids[-1]}" if len(ids) > 1 else (f"layer {ids[0]}" if ids else "no layers")
        parts = (["embedding"] if c == 0 else []) + (
            ["final norm, LM head" + (" (tied embedding)" if cfg.model.tie_embeddings else "")]
            if c == chunks - 1 else [])
        cost = len(ids) + (head if c == chunks - 1 else 0.0)
        lines.append(f"  chunk {c}: rank {c % p.pp} local {c // p.pp}: {span:<15} ({len(ids)})"
                     f"{' + ' + ', '.join(parts) if parts else ''}  cost {cost:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- building

def build_stage(cfg: Config, ps: ParallelState, seed: int, tracker=None, dtype=torch.float32,
                layout: Layout | None = None, model_cls=None) -> list[GPTModel]:
    """This rank's model chunks, local chunk order. Weights are drawn per (seed, global name), so
    they equal the one-process model's whatever the layout. layout: the run's (default: from cfg).
    model_cls: a GPTModel subclass (the reward model), default GPTModel."""
    if ps.pp.size != cfg.parallel.pp:
        raise ConfigError(f"parallel.pp: the config says {cfg.parallel.pp}, the process groups have {ps.pp.size}")
    t, layout = cfg.train, layout or Layout.from_config(cfg)
    return [build_model(cfg.model, ps, seed, sequence_parallel=cfg.parallel.sequence_parallel,
                        layer_ids=ids, pre_process=pre, post_process=post, recompute=t.recompute,
                        recompute_num_layers=t.recompute_num_layers, tracker=tracker,
                        device=ps.device, dtype=dtype, model_cls=model_cls)
            for ids, pre, post in layout.stage_chunks(cfg.model, ps.pp.rank)]


def meta_stage(cfg: Config, tp_rank: int = 0, pp_rank: int = 0, layout: Layout | None = None,
               ep_rank: int = 0) -> list[GPTModel]:
    """The chunks of the rank at (tp_rank, pp_rank, ep_rank) on the meta device: shapes, ShardSpecs
    and parameter counts of the real model, with nothing allocated and no process group. With ep > 1
    it is the rank of dp = ep (edp = 1) at dp index ep_rank."""
    p = cfg.parallel
    ps = ParallelState.virtual(tp=p.tp, pp=p.pp, tp_rank=tp_rank, pp_rank=pp_rank, ep=p.ep, ep_rank=ep_rank,
                               **({"dp": p.ep, "dp_rank": ep_rank} if p.ep > 1 else {}))
    return build_stage(cfg, ps, seed=0, layout=layout)

