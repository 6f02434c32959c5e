"""Which layers each pipeline chunk holds, and building this rank's chunks.

The model is cut into pp*vp chunks of consecutive layers. Global chunk c lives on pp rank
c % pp as local chunk c // pp (the layout of `schedule.py`), so local chunk k of rank r is
global chunk k*pp + r. Chunk 0 also holds the embedding; the last chunk holds the final norm
and the LM head (or, with tied embeddings and pp > 1, its own copy of the embedding).

Balancing rule, when `parallel.layers_per_stage` is not given. Each chunk's cost is counted
in layer-equivalents of forward FLOPs per token (backward is ~2x forward for every part, so
the ratio is the same for training):
  - a layer:     2*(QKV + out-proj + MLP weights) + 2*2*heads*head_dim*s/2 (causal scores and PV),
                 the same terms as `config.flops_per_token`;
  - the LM head: 2*h*V_padded (one [s, h] x [h, V] matmul; the softmax is elementwise, ignored),
                 so about V/(12h) of a layer for an MHA 4h-MLP model: 0.6 for the 70B flagship,
                 several layers for a tiny model with a big vocab;
  - the embedding: 0 (a row gather; its backward is a scatter-add of b*s*h numbers).
The split minimises the most expensive chunk, with at least one layer per chunk. Among the
splits that reach that minimum, spare layers are taken from the most expensive chunk first,
from the first chunk on ties: under 1F1B rank 0 holds the most microbatches in flight (pp),
so a lighter first stage also lowers the peak activation memory. For the 70B flagship (70
layers, pp=4) this gives 17, 18, 18, 17.
"""
from __future__ import annotations

import math

import torch

from ..config import Config, ConfigError, ModelConfig
from ..model.gpt import GPTModel, build_model
from ..parallel.state import ParallelState


# ----------------------------------------------------------------------------- the split (pure)

def head_cost(m: ModelConfig, seq_len: int, tp: int = 1) -> float:
    """Forward FLOPs of the LM head per token, in layers (see the module docstring)."""
    h, d = m.hidden_size, m.head_dim
    layer = 2 * (h * (m.num_heads + 2 * m.kv_heads) * d + m.num_heads * d * h
                 + (3 if m.gated else 2) * h * m.ffn_hidden_size) + 2 * 2 * m.num_heads * d * seq_len / 2
    return 2 * h * m.padded_vocab(tp) / layer


def balanced_counts(num_layers: int, extra: list[float]) -> list[int]:
    """Layers per chunk minimising max(layers + extra) over chunks, each chunk getting >= 1 layer."""
    chunks = len(extra)
    if num_layers < chunks:
        raise ConfigError(f"parallel.pp: {num_layers} layers are fewer than pp*vp={chunks} chunks")

    def capacity(cap: float) -> list[int]:  # the most layers each chunk takes without costing more than cap
        return [math.floor(cap - e + 1e-9) for e in extra]

    # the optimal cap is some chunk's cost n + e; capacity grows with cap, so bisect the candidates
    floor = max(1 + e for e in extra)
    caps = sorted({n + e for e in extra for n in range(1, num_layers + 1) if n + e >= floor - 1e-9})
    lo, hi = 0, len(caps) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(capacity(caps[mid])) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    counts = capacity(caps[lo])
    while sum(counts) > num_layers:  # spare layers: from the costliest chunk, the first one on ties
        c = max((c for c in range(chunks) if counts[c] > 1), key=lambda c: (counts[c] + extra[c], -c))
        counts[c] -= 1
    return counts


def chunk_layers(cfg: Config) -> list[list[int]]:
    """Global layer ids of each of the pp*vp global chunks, in order."""
    check_layout(cfg)
    p, m = cfg.parallel, cfg.model
    chunks = p.pp * p.vp
    if p.layers_per_stage is not None:
        counts = list(p.layers_per_stage)
    else:
        extra = [0.0] * chunks
        extra[-1] += head_cost(m, cfg.train.seq_len, p.tp)
        counts = balanced_counts(m.num_layers, extra)
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    flat = [i for ids in out for i in ids]
    if flat != list(range(m.num_layers)):  # no layer dropped or duplicated
        raise ConfigError(f"parallel.layers_per_stage: the split {counts} does not cover layers 0..{m.num_layers - 1} once")
    return out


def stage_chunks(cfg: Config, pp_rank: int) -> list[tuple[list[int], bool, bool]]:
    """(layer ids, pre_process, post_process) of each local chunk of pipeline rank pp_rank."""
    p = cfg.parallel
    layers, last = chunk_layers(cfg), p.pp * p.vp - 1
    return [(layers[k * p.pp + pp_rank], k * p.pp + pp_rank == 0, k * p.pp + pp_rank == last)
            for k in range(p.vp)]


def check_layout(cfg: Config, num_microbatches: int | None = None, schedule: str | None = None) -> None:
    """Everything about the pipeline layout that can fail, as one-line ConfigErrors naming the field,
    before any model is built or any rank communicates. Repeats what `config.validate` checks
    (a Config built by hand skips it) and adds the schedule's own constraints."""
    p, m = cfg.parallel, cfg.model
    for name in ("pp", "vp"):
        value = getattr(p, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{name}: expected a positive integer, got {value!r}")
    chunks = p.pp * p.vp
    if p.vp > 1 and p.pp == 1:
        raise ConfigError("parallel.vp: virtual stages need parallel.pp > 1")
    if p.layers_per_stage is not None:
        counts = p.layers_per_stage
        if len(counts) != chunks or any(not isinstance(n, int) or n < 0 for n in counts):
            raise ConfigError(f"parallel.layers_per_stage: expected {chunks} non-negative integers (pp*vp), got {counts}")
        if sum(counts) != m.num_layers:
            raise ConfigError(f"parallel.layers_per_stage: sums to {sum(counts)}, but model.num_layers={m.num_layers}")
    elif m.num_layers < chunks:
        raise ConfigError(f"parallel.vp: {m.num_layers} layers are fewer than pp*vp={p.pp}*{p.vp}={chunks} chunks")
    schedule = schedule or cfg.train.schedule
    if schedule not in ("gpipe", "1f1b", "interleaved"):
        raise ConfigError(f"train.schedule: expected gpipe, 1f1b or interleaved, got {schedule!r}")
    if schedule == "gpipe" and p.vp > 1:
        raise ConfigError("train.schedule: gpipe has no interleaved variant; use 1f1b with parallel.vp > 1")
    if p.sequence_parallel and p.tp > 1 and cfg.train.seq_len % p.tp:
        raise ConfigError(f"train.seq_len: {cfg.train.seq_len} is not divisible by parallel.tp={p.tp} (sequence parallel)")
    if num_microbatches is not None and p.pp > 1 and num_microbatches < p.pp:
        raise ConfigError(f"train.global_batch_size: gives {num_microbatches} microbatches per pipeline, "
                          f"fewer than parallel.pp={p.pp}")


def describe_split(cfg: Config) -> str:
    """The split as printed at start-up: one line per global chunk, with its cost in layers."""
    p = cfg.parallel
    layers, chunks = chunk_layers(cfg), p.pp * p.vp
    head = head_cost(cfg.model, cfg.train.seq_len, p.tp)
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

def build_stage(cfg: Config, ps: ParallelState, seed: int, tracker=None, dtype=torch.float32) -> list[GPTModel]:
    """This rank's model chunks, local chunk order. Weights are drawn per (seed, global name), so
    they equal the one-process model's whatever the layout."""
    if ps.pp.size != cfg.parallel.pp:
        raise ConfigError(f"parallel.pp: the config says {cfg.parallel.pp}, the process groups have {ps.pp.size}")
    t = cfg.train
    return [build_model(cfg.model, ps, seed, sequence_parallel=cfg.parallel.sequence_parallel,
                        layer_ids=ids, pre_process=pre, post_process=post, recompute=t.recompute,
                        recompute_num_layers=t.recompute_num_layers, tracker=tracker,
                        device=ps.device, dtype=dtype)
            for ids, pre, post in stage_chunks(cfg, ps.pp.rank)]
