"""Communication volume of one training step, from the config alone.

`expected_comm_bytes` predicts, per (kind, group), the bytes that `ParallelState.counter` records
during one `Trainer.train_step` (the pipeline schedule over all microbatches, then the optimizer
step). Like the counter, it counts the bytes *handed to* each collective (its input tensor), not
what the ring moves: an all-gather of [s/t, b, h] counts N/t, a reduce-scatter of [s, b, h] counts
N. `ring_bytes_per_rank` turns that into the bytes each rank puts on the wire.

Notation: t, p, v, d = TP, PP, virtual-stage and DP degrees; m = microbatches per step on one
pipeline; s, b, h = sequence, micro batch, hidden; e = bytes of the training dtype;
N = s*b*h*e, one [s, b, h] activation. Per microbatch and model chunk, on every TP rank:

  TP without SP (all_reduce, tp):
    embedding output (first chunk)                     1 x N   forward
    each layer: attention proj and MLP fc2 outputs     2 x N   forward (+1 or 2 under full recompute)
    each layer: QKV and fc1 input copies               2 x N   backward
    LM head input copy (last chunk)                    1 x N   backward
    vocab-parallel cross-entropy (last chunk): the row max [s, b] and the stacked
    (label logit, sum exp) [2, s, b], both fp32        12*s*b
  TP with SP:
    reduce_scatter (tp), N each: embedding fwd, per layer 2 fwd (+1 or 2 per full recompute)
      and 2 bwd (QKV/fc1 input gradients), LM head input gradient;
    all_gather (tp), N/t each: embedding bwd, per layer 2 fwd (+2 per recompute) and 2 bwd
      (gradients of the proj/fc2 outputs), LM head input fwd. Backward does not re-gather:
      F.linear keeps the gathered input for the weight gradient;
    full recompute re-runs a layer's forward up to its last op that saved a tensor (torch's
      checkpoint early stop): both input gathers, and the proj output's collective; the fc2
      output's only when hidden dropout > 0 (its mask is saved after it);
    all_reduce (tp): the cross-entropy's 12*s*b, as above.
  PP (send and recv, pp): a chunk that is not the first global chunk receives its input and
    sends its input's gradient; one that is not the last sends its output and receives the
    gradient: [s/t (SP) or s, b, h] x e each. Over the pipeline: p*v - 1 boundaries, each one
    activation forward and one gradient backward per microbatch.

Once per step (Optimizer.step), gradients are fp32 (the grad buffer) whatever the dtype:
  - TP-partial gradients (optim/finalize.py), per chunk: with SP one all_reduce (tp) of every
    norm weight/bias and row-parallel bias, concatenated; when KV heads are replicated over TP
    (kv_heads < t) one all_reduce (tp) of [kv_heads, d, h] for K and for V (and [kv_heads, d]
    for their biases) per layer;
  - tied embedding with p > 1: all_reduce (embedding) of the [V/t, h] gradient on the first and
    last stage;
  - DP, distributed optimizer: per bucket a reduce_scatter (dp) of the padded fp32 bucket and an
    all_gather (dp) of this rank's shard (bucket/d) in the param dtype; plain optimizer: an
    all_reduce (dp) of each padded fp32 bucket. Buckets follow GradBuffer's plan exactly
    (reverse registration order, closed at bucket_size_mb, padded to a multiple of d);
  - grad norm: all_reduce of one fp64 over the world (distributed optimizer) or the mp group;
  - fp16 only: the inf check, all_reduce of one fp32 over the world (the step is assumed not
    skipped: a skipped step does no norm and no all-gather).
  - the trainer's logged loss: all_reduce of one fp64 over the world (a Trainer step).
Context parallelism (cp = c > 1): every per-microbatch figure above is of this rank's s/c tokens
(N = s/c*b*h*e, the cross-entropy's 12*s/c*b); gradients are reduced over dp*c ranks (group
"dp_cp", bucket padding to a multiple of dp*c); and ring attention (parallel/context.py) sends and
receives, per layer and microbatch, (c-1) K/V blocks [2, b, s/c, nkv_local, d] x e forward, the same
again backward plus c dK/dV blocks in fp32 (`cp_ring_bytes`), and the forward's once more for each
layer whose attention is recomputed (full recompute, or selective: the core is rerun). A sliding
window skips blocks but not hops: the bytes are the same.
MoE layers (model/moe.py), per microbatch, s_l = s/cp (/t with SP) tokens of this rank: no TP
collective in the routed MLP (the shared expert's, if any, are the dense MLP's); with SP an all_reduce
(tp), with cp > 1 an all_reduce (cp), of the E int64 expert counts; with a capacity factor an
all_gather (tp, under SP) of the chosen weights (fp32) and experts (int64), [s_l*b, k] each, then with
cp > 1 an all_gather (cp) of the TP-gathered [s/cp*b, k] ones; with ep > 1, all_to_all (ep): the E int64
counts, then the M kept rows of h each way forward and backward, dispatched and combined:
E*8 + 2*(M + R)*h*e with R the rows received. M and R depend on the routing: given the rank's
M + R summed over its MoE calls (`moe_rows`, MoEContext.dispatched_rows() after the step) the bytes are
exact per rank, drops included; without it the model counts R = M = s_l*b*k, dropless (then the world
sum is exact, and each rank's under balance; with a capacity factor an upper bound). Once per step:
with moe_router_bias_rate, an all_reduce (dp) of the E int64 loads per MoE layer (the selection-bias
update); with SP the router and expert gradients join the TP-partial all-reduce (their weights are
whole on every TP rank); expert buckets reduce over edp (group "edp" when ep > 1, size d/ep*cp: an
expert is replicated over CP too). MoE with full recompute and MoD layers are not modelled.
Not counted by the counter, so not here: NCCL's warm-up all-reduce in P2P, barriers, and the
checkpoint's success-flag all-reduce and tmp-dir nonce broadcast (not per step).
"""
from __future__ import annotations

import math
from collections import defaultdict

from .config import DTYPES, Config, ModelConfig, dp_mode
from .model_size import chunk_param_numels, layer_param_numels
from .layout import Layout
from .model.variants import cp_method
from .optim.grad_buffer import plan_buckets
from .parallel.state import sp_reduce_kind

GRAD_BYTES = 4          # the grad buffer is fp32 in every dtype


def _chunk_param_numels(cfg: Config, layer_ids: list[int], pre: bool, post: bool, kinds: bool = False) -> list:
    """numel of each parameter of one chunk on one TP rank, in GPTModel's registration order
    (kinds: (numel, is an expert weight) pairs)."""
    p = cfg.parallel
    return chunk_param_numels(cfg.model, p.tp, len(layer_ids), pre, post, layer_ids, p.ep, kinds)


def _bucket_sizes(cfg: Config, chunks: list, tied_alone: bool, dp: int) -> list[tuple[int, bool]]:
    """(padded size in elements, holds expert weights) of GradBuffer's buckets on one rank: its own plan."""
    bucket_elems = max(1, int(cfg.parallel.bucket_size_mb * 2 ** 20) // GRAD_BYTES)
    pairs = [_chunk_param_numels(cfg, ids, pre, post, kinds=True) for ids, pre, post in chunks]
    numels = [[n for n, _ in c] for c in pairs]
    kinds = [[int(x) for _, x in c] for c in pairs]
    # the tied embedding (registered first in its chunk) sits alone
    alone = [{0} if tied_alone and (pre or (post and cfg.model.tie_embeddings)) else set()
             for _, pre, post in chunks]
    return [(end - start, bool(kinds[c][idx[0]])) for c, idx, start, end in
            plan_buckets(numels, bucket_elems, dp, alone, kinds)]


def _root_gathers(kind: str, pp: int, vp: int, m: int, rank: int, chunk: int) -> int:
    """How often zero3 gathers a chunk's root unit in one step: each time a forward finds no microbatch
    of that chunk in flight (the unit is resharded when the last in-flight backward is done)."""
    from .pipeline.schedule import _compute_order
    live, gathers = 0, 0
    for op in _compute_order(kind, pp, vp, m, rank):
        if op.chunk == chunk:
            gathers += op.kind == "F" and live == 0
            live += 1 if op.kind == "F" else -1
    return gathers


def _zero_groups(cfg: Config, chunks: list, tied_alone: bool, dp: int, mode: str,
                 pp_rank: int) -> list[tuple[int, int]]:
    """(padded size, all-gathers per step) of each flat group of optim/zero.py (zero2: the buckets, one
    gather after the step) or zero3.py (units: each layer gathered twice per microbatch; the embedding and
    the final norm + head, the root units, as _root_gathers says)."""
    layout = Layout.from_config(cfg)
    mb = layout.num_microbatches
    if mode == "zero2":
        return [(size, 1) for size, _ in _bucket_sizes(cfg, chunks, tied_alone, dp)]
    pad = lambda n: -(-n // dp) * dp                                   # noqa: E731
    out = []
    for k, (ids, pre, post) in enumerate(chunks):
        roots = _root_gathers(cfg.train.schedule, layout.pp, layout.vp, mb, pp_rank, k)
        numels = _chunk_param_numels(cfg, ids, pre, post)
        per_layer = len(_chunk_param_numels(cfg, ids[:1], False, False)) if ids else 0
        first = 1 if pre or (post and cfg.model.tie_embeddings) else 0
        layers = numels[first:first + per_layer * len(ids)]
        root = numels[:first] + numels[first + per_layer * len(ids):]
        if first:                                                      # the embedding: a unit of its own
            out.append((pad(root.pop(0)), roots))
        if root:
            out.append((pad(sum(root)), roots))
        out += [(pad(sum(layers[i * per_layer:(i + 1) * per_layer])), 2 * mb) for i in range(len(ids))]
    return out


def group_sizes(cfg: Config, world_size: int) -> dict[str, int]:
    layout = Layout.from_config(cfg, world_size)
    return layout.sizes | {"mp": layout.tp * layout.cp * layout.pp, "world": world_size,
                           "embedding": 2 if layout.pp > 1 else 1, "dp_cp": layout.dp * layout.cp,
                           "edp": layout.dp // layout.ep * layout.cp}


def cp_ring_bytes(layout: Layout, m, e: int) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends (and as many it receives) in one layer's ring
    attention for one microbatch: (cp-1) K/V blocks forward; (cp-1) K/V blocks and cp fp32 dK/dV
    blocks backward. A K/V block is [2, b, s/cp, nkv_local, d]."""
    c = layout.cp
    if c == 1 or cp_method(m) != "ring":
        return 0, 0
    block = _kv_block(layout, m)
    return (c - 1) * block * e, (c - 1) * block * e + c * block * GRAD_BYTES


def _kv_block(layout: Layout, m) -> int:
    """Elements of this rank's K/V [2, b, s/cp, nkv_local, d]."""
    nkv = m.kv_heads // layout.tp if m.kv_heads % layout.tp == 0 else 1
    return 2 * layout.micro_batch * (layout.seq_len // layout.cp) * nkv * m.head_dim


def cp_allgather_bytes(layout: Layout, m, e: int) -> tuple[int, int]:
    """(forward all-gather, backward reduce-scatter) bytes counted in one layer's all-gather CP attention
    for one microbatch (model/variants.py): the all-gather counts this rank's K/V block, the
    reduce-scatter of dK/dV (input dtype) the whole sequence's, cp blocks."""
    if layout.cp == 1 or cp_method(m) != "allgather":
        return 0, 0
    block = _kv_block(layout, m) * e
    return block, layout.cp * block


def _rank_bytes(cfg: Config, world_size: int, e: int, pp_rank: int,
                backend: str = "nccl", moe_rows: int | None = None) -> dict[tuple[str, str], int]:
    p, m, tr = cfg.parallel, cfg.model, cfg.train
    sizes, layout = group_sizes(cfg, world_size), Layout.from_config(cfg, world_size)
    t, pp, vp, dp, sp = layout.tp, layout.pp, layout.vp, layout.dp, layout.sp
    s, b, h = layout.seq_len // layout.cp, layout.micro_batch, m.hidden_size   # this rank's tokens
    mb = layout.num_microbatches
    N = s * b * h * e
    ce = 3 * s * b * 4                                      # row max [s, b] + stacked [2, s, b], fp32
    out: dict[tuple[str, str], int] = defaultdict(int)
    chunks = layout.stage_chunks(m, pp_rank)

    # -------------------------------------------------------------- per microbatch: TP and PP
    for k, (ids, pre, post) in enumerate(chunks):
        n = len(ids)
        n_rc = 0
        if tr.recompute == "full":
            n_rc = min(n, n if tr.recompute_num_layers is None else tr.recompute_num_layers)
        # A recomputed layer re-runs its forward in backward, but torch's non-reentrant checkpoint
        # stops at the last op that saved a tensor for backward: without hidden dropout (whose mask
        # is saved) that is fc2's matmul, so the collective on fc2's output is not repeated.
        rc_out = 2 if m.hidden_dropout > 0 else 1
        routed = sum(1 for i in ids if m.is_moe_layer(i) and not m.moe_shared_expert_size)  # MLP without TP
        if t > 1:
            if sp:
                # collectives entering (gather) / leaving (reduce-scatter) the TP regions
                rs = int(pre) + 2 * n + rc_out * n_rc + 2 * n + int(post) - 2 * routed
                ag = int(pre) + 2 * n + 2 * n_rc + 2 * n + int(post) - 2 * routed
                out[(sp_reduce_kind(backend), "tp")] += mb * rs * N    # all-reduce + slice on gloo
                out[("all_gather", "tp")] += mb * ag * (N // t)
                if post:
                    out[("all_reduce", "tp")] += mb * ce
            else:
                ar = int(pre) + 2 * n + rc_out * n_rc + 2 * n + int(post) - 2 * routed
                out[("all_reduce", "tp")] += mb * (ar * N + (ce if post else 0))
        ring_f, ring_b = cp_ring_bytes(layout, m, e)
        reruns = n if tr.recompute == "selective" else n_rc  # attention forwards run again in backward
        for kind in ("send", "recv"):
            if ring_f:
                out[(kind, "cp")] += mb * (n * (ring_f + ring_b) + reruns * ring_f)
        _moe_microbatch_bytes(cfg, layout, ids, e, mb, out, moe_rows is None)
        ag_f, ag_b = cp_allgather_bytes(layout, m, e)
        if ag_f:
            out[("all_gather", "cp")] += mb * (n + reruns) * ag_f
            out[("reduce_scatter", "cp")] += mb * n * ag_b
        c = k * pp + pp_rank                                # global chunk index
        act = math.prod(layout.activation_shape(m)) * e
        for is_boundary in (c > 0, c < pp * vp - 1):      # input side, output side
            if is_boundary:
                out[("send", "pp")] += mb * act
                out[("recv", "pp")] += mb * act

    if moe_rows is not None and layout.ep > 1:          # the kept rows the dispatches moved (module docstring)
        out[("all_to_all", "ep")] += 2 * moe_rows * h * e
    # -------------------------------------------------------------- once per step: the optimizer
    mode = dp_mode(tr, p)
    per_group = mode in ("zero2", "zero3")        # TP-partial grads finished per group and microbatch
    if t > 1:
        for ids, pre, post in chunks:
            norm = (2 if m.norm == "layernorm" else 1) * h
            partial = 0
            if sp:
                partial = len(ids) * (2 * norm + (2 * h if m.bias else 0)) + (norm if post else 0)
                partial += _moe_tp_partial(m, t, p.ep, ids)
                partial += m.workspace_tokens * h if pre else 0   # workspace vectors: SP rows per TP rank
            if partial:
                out[("all_reduce", "tp")] += (mb if per_group else 1) * partial * GRAD_BYTES
            if m.kv_heads % t:                              # KV heads replicated over TP ranks
                kv, d = m.kv_heads, m.head_dim
                per_layer = 2 * kv * d * h + (2 * kv * d if m.bias else 0)
                out[("all_reduce", "tp")] += (mb if per_group else 1) * len(ids) * per_layer * GRAD_BYTES
    tied = m.tie_embeddings and pp > 1
    if tied:
        holders = sum(1 for ids, pre, post in chunks if pre or post)
        emb = m.padded_vocab(t) // t * h
        emb = -(-emb // (dp * layout.cp)) if per_group else emb   # zero2/3 sum the owned shard (dp x cp) only
        out[("all_reduce", "embedding")] += holders * emb * GRAD_BYTES
    d, grads = dp * layout.cp, "dp" if layout.cp == 1 else "dp_cp"   # parameters are replicated over CP
    if d > 1 and per_group:                             # (zero2/3 are refused with MoE by config_checks.validate)
        for size, gathers in _zero_groups(cfg, chunks, tied, d, mode, pp_rank):
            out[("reduce_scatter", grads)] += mb * size * GRAD_BYTES
            out[("all_gather", grads)] += gathers * size // d * e
    elif not per_group:
        for size, expert in _bucket_sizes(cfg, chunks, tied, d):
            group = "edp" if expert and layout.ep > 1 else grads   # the bucket's group (GradBuffer)
            if sizes[group] == 1:
                continue
            if p.distributed_optimizer:
                out[("reduce_scatter", group)] += size * GRAD_BYTES
                out[("all_gather", group)] += size // sizes[group] * e
            else:
                out[("all_reduce", group)] += size * GRAD_BYTES
    if m.moe_router_bias_rate and sizes["dp"] > 1:          # the selection-bias update: E int64 per MoE layer
        out[("all_reduce", "dp")] += 8 * m.moe_num_experts * sum(m.is_moe_layer(i) for ids, _, _ in chunks for i in ids)
    experts = layout.ep > 1 and any(m.is_moe_layer(i) for ids, _, _ in chunks for i in ids)
    norm_group = "mp" if mode == "ddp" and not experts else "world"
    if sizes[norm_group] > 1:
        out[("all_reduce", norm_group)] += 8                # one fp64: the sum of squares
    if tr.dtype == "fp16" and world_size > 1:
        out[("all_reduce", "world")] += 4                   # one fp32: found inf/NaN
    if world_size > 1:
        out[("all_reduce", "world")] += 8                   # one fp64: the trainer's logged loss
    return {k: v for k, v in out.items() if v}


def expected_comm_bytes(cfg: Config, world_size: int, dtype_bytes: int | None = None,
                        rank: int | None = None, backend: str = "nccl",
                        moe_rows: list[int] | None = None) -> dict[tuple[str, str], int]:
    """Bytes per (kind, group) recorded in one training step: by `rank`'s counter, or summed over
    every rank of the world when rank is None. dtype_bytes defaults to train.dtype's. backend: the
    SP reduce-scatters are counted as all-reduces on gloo (parallel/state.py sp_reduce_kind).
    moe_rows: per rank, the rows its MoE all-to-alls moved in the step (MoEContext.dispatched_rows,
    summed over its chunks); without it they are counted dropless (module docstring)."""
    e = dtype_bytes if dtype_bytes is not None else DTYPES[cfg.train.dtype].itemsize
    if rank is not None:
        return _rank_bytes(cfg, world_size, e, Layout.from_config(cfg, world_size).rank_coords(rank)["pp"], backend,
                           None if moe_rows is None else moe_rows[rank])
    total: dict[tuple[str, str], int] = defaultdict(int)
    for r in range(world_size):
        for key, n in expected_comm_bytes(cfg, world_size, e, r, backend, moe_rows).items():
            total[key] += n
    return dict(total)


def ring_factor(kind: str, size: int) -> float:
    """Bytes a rank sends per byte counted (the collective's input), for ring algorithms:
    all-reduce 2(g-1)/g; reduce-scatter (g-1)/g of its full input; all-gather (g-1) x its shard,
    i.e. (g-1)/g of the gathered output; a send is itself; a receive sends nothing."""
    g = size
    return {"all_reduce": 2 * (g - 1) / g, "reduce_scatter": (g - 1) / g, "all_gather": float(g - 1),
            "broadcast": 1.0, "send": 1.0, "recv": 0.0}[kind]


def ring_bytes_per_rank(cfg: Config, world_size: int, dtype_bytes: int | None = None,
                        rank: int = 0) -> dict[tuple[str, str], float]:
    """Bytes `rank` sends on the wire per (kind, group) in one step, under ring collectives."""
    sizes = group_sizes(cfg, world_size)
    counted = expected_comm_bytes(cfg, world_size, dtype_bytes, rank)
    return {k: n * ring_factor(k[0], sizes[k[1]]) for k, n in counted.items() if k[0] != "recv"}


def summary(counts: dict[tuple[str, str], int]) -> dict[str, int]:
    """The same "group/kind" keys as CommCounter.summary() (what metrics.jsonl logs)."""
    return {f"{group}/{kind}": n for (kind, group), n in sorted(counts.items())}


def _moe_tp_partial(m: ModelConfig, t: int, ep: int, ids: list[int]) -> int:
    """Elements of a chunk's router and expert gradients (TP-partial under SP: whole weights, sequence shards)."""
    return sum(m.moe_num_experts * m.hidden_size + sum(n for n, expert in layer_param_numels(m, t, i, ep) if expert)
               for i in ids if m.is_moe_layer(i))


def _moe_microbatch_bytes(cfg: Config, layout: Layout, ids: list[int], e: int, mb: int, out: dict,
                          dropless_rows: bool = True) -> None:
    """One chunk's MoE collectives over mb microbatches (module docstring), added to out; the
    all-to-all's rows as if dropless when dropless_rows (else the caller adds the measured ones)."""
    m = cfg.model
    n_moe = sum(1 for i in ids if m.is_moe_layer(i))
    if not n_moe:
        return
    t, sp, E, k, h, cp = layout.tp, layout.sp, m.moe_num_experts, m.moe_top_k, m.hidden_size, layout.cp
    local = layout.seq_len // cp * layout.micro_batch                      # this CP rank's tokens
    tokens = local // t if sp else local
    capacity = m.moe_capacity_factor is not None
    if sp:
        out[("all_reduce", "tp")] += mb * n_moe * E * 8
        if capacity:
            out[("all_gather", "tp")] += mb * n_moe * tokens * k * (4 + 8)
    if cp > 1:
        out[("all_reduce", "cp")] += mb * n_moe * E * 8
        if capacity:
            out[("all_gather", "cp")] += mb * n_moe * local * k * (4 + 8)
    if layout.ep > 1:
        rows = tokens * k if dropless_rows else 0           # M = R: each rank's selections (dropless)
        out[("all_to_all", "ep")] += mb * n_moe * (E * 8 + 2 * 2 * rows * h * e)
