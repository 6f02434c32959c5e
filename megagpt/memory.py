"""Analytic memory model: bytes held by the most loaded GPU of a (tp, pp, vp, dp) layout.

Used by the dry run and by the planner, so both refuse the same layouts. Everything is a
closed-form count from the config; nothing is allocated.

Conventions
-----------
Parameters on a rank. Layers are split into pp*vp chunks by `Layout.chunk_layers`, the split
the model is built with; pp rank r holds chunks r, r+pp, r+2pp, ... Each chunk's parameters
are `model_size.chunk_param_numels`: Q, the output projection and the MLP are split over tp; K and V
by whole heads when kv_heads % tp == 0, otherwise each rank holds the one KV head its query
heads use (replicated over tp/kv_heads ranks); norm weights and the row-parallel biases are
replicated. The first stage also holds the embedding shard [padded_vocab/tp, h]; the last stage
holds the final norm and the LM-head shard (untied), or, when tied and pp > 1, its own copy of
the embedding shard.

Bytes per parameter. fp32: weights 4, grads 4, Adam m and v 8. bf16/fp16: weights 2, fp32
grad-accumulation buffer 4, optimizer = fp32 main weights + m + v = 12. The optimizer states
are divided by dp with the distributed optimizer (ZeRO-1), hence 6 + 12/d for bf16, 18
without; an expert weight's by dp/ep (its edp group). Weights and grads are never sharded over dp.
MoE layers count E/ep experts per rank; their activations are counted as a dense layer's (not modelled).

Activations: see `layer_activation_terms` for the term-by-term count (Korthikanti et al. 2022
adapted to GQA and gated MLPs) and `memory_per_rank` for the pipeline in-flight factor.

Context parallelism (cp > 1): a rank holds s/cp tokens, so every activation term (and the
logits) is that of seq_len/cp; ring attention keeps no s^2 term whatever the kernel (it saves q,
k, v, its output and the fp32 log-sum-exp, as flash attention does). Parameters are replicated
over cp, so weights and grads do not shrink, and the distributed optimizer shards over dp*cp.
Not counted: the ring's transient buffers (two K/V blocks, and in backward a dK/dV block in fp32).

Attention variants: a sliding window (and the workspace mask) saves FLOPs, not activations. Flash-attn
with a window keeps q, k, v, out and the LSE as without one, so no term changes; on the CPU the
block-sparse path (model/variants.blocked_attention) keeps the same plus per-block K/V copies, linear in
s (tests/test_attention_variants.py::test_window_keeps_no_s2_activations measures it).
"""
from __future__ import annotations

from .config import DTYPES, RECOMPUTE, ModelConfig, check_choice
from .model_size import chunk_param_numels, layer_params
from .layout import Layout


def params_per_rank(m: ModelConfig, layout: Layout, experts_only: bool = False) -> list[int]:
    """Parameters held by each pp rank (one TP shard, its ep share of the experts), summed over its
    chunks; experts_only: only the expert weights (their optimizer state is sharded over edp = dp/ep)."""
    out = [0] * layout.pp
    if not (m.moe_num_experts or m.mod_layers):          # every layer alike: chunk_param_numels is linear in them
        if experts_only:
            return out
        per_layer = layer_params(m, layout.tp)
        for rank, ids, pre, post in layout.all_chunks(m):
            out[rank] += len(ids) * per_layer + (sum(chunk_param_numels(m, layout.tp, 0, pre, post)) if pre or post else 0)
        return out
    for rank, ids, pre, post in layout.all_chunks(m):
        numels = chunk_param_numels(m, layout.tp, len(ids), pre, post, ids, layout.ep, kinds=True)
        out[rank] += sum(n for n, expert in numels if expert or not experts_only)
    return out


def bytes_per_param(dtype: str, dp: int, distributed_optimizer: bool, dp_mode: str | None = None) -> dict:
    """(weights, grads, optimizer) bytes per parameter; optimizer already divided by dp if sharded.
    dp_mode (train.dp_mode; None: zero1 or ddp as distributed_optimizer says): zero2 also shards the
    fp32 grads (4/d), zero3 the weights too (e/d; plus the units being gathered, not counted here).
    bf16: zero1 6 + 12/d, zero2 2 + 16/d, zero3 18/d; fp32: 8 + 8/d, 4 + 12/d, 16/d."""
    w = DTYPES[dtype].itemsize
    g, o = 4, (8 if w == 4 else 12)        # fp32 grads always; fp32 main weights only when w < 4
    mode = dp_mode or ("zero1" if distributed_optimizer else "ddp")
    return {"weights": w / dp if mode == "zero3" else float(w),
            "grads": g / dp if mode in ("zero2", "zero3") else float(g),
            "optimizer": float(o) if mode == "ddp" else o / dp}


def layer_activation_terms(m: ModelConfig, tp: int, seq_len: int, micro_batch: int,
                           sequence_parallel: bool = True, flash: bool = True, dtype: str = "bf16") -> dict:
    """Bytes one layer keeps for backward, per microbatch, on one TP rank, term by term (no recompute).

    Korthikanti et al. 2022 count sbh(34 + 5as/h) for MHA + 4h GELU MLP with 16-bit tensors and
    1-byte dropout masks. Term by term, with q = heads*d and kv = kv_heads*d (per rank), f = ffn:
      attention block                      MLP block
        norm1 input        2sbh  [r]         norm2 input          2sbh  [r]
        QKV input (norm)   2sbh  [r]         MLP input (norm)     2sbh  [r]
        Q                  2sbq  /t          fc1 out (GELU input) 2sbf  /t   gated: gate+up 4sbf /t
        K, V               4sb kv /t         act out (fc2 input)  2sbf  /t
        softmax out        2as^2b /t         dropout mask          sbh  [r]  if hidden_dropout
        attn-dropout mask   as^2b /t  if attention_dropout
        attn-dropout out   2as^2b /t  if attention_dropout
        proj input         2sbq  /t
        dropout mask        sbh  [r]  if hidden_dropout
    With q = kv = h, f = 4h and both dropouts on this is 34sbh + 5as^2b (Korthikanti exactly);
    SwiGLU keeps 6sbf/t instead of 4sbf/t, and GQA shrinks K, V to 4sb*kv. [r] terms are
    replicated over TP and divided by t only with sequence parallel (with SP the norm output is
    stored sharded and all-gathered again in backward, as Megatron does).
    Flash attention / SDPA (flash=True) stores none of the s^2 terms: only its output (which is
    the proj input, counted once) and the fp32 logsumexp, 4asb/t bytes. fp32 activations double
    every 16-bit term; dropout masks stay 1 byte (bool). Biases change none of these counts.
    """
    s, b, h, d, f = seq_len, micro_batch, m.hidden_size, m.head_dim, m.ffn_hidden_size
    e = DTYPES[dtype].itemsize
    a_r, kv_r = m.num_heads // tp, m.kv_heads_per_rank(tp)
    rep = s * b * h / (tp if sequence_parallel else 1)         # one replicated [s, b, h] element count
    hd, ad = m.hidden_dropout > 0, m.attention_dropout > 0
    t = {
        "norm1_input": e * rep,
        "qkv_input": e * rep,
        "q": e * s * b * a_r * d,
        "kv": 2 * e * s * b * kv_r * d,
        "proj_input": e * s * b * a_r * d,
        "attn_dropout_mask": rep if hd else 0.0,
        "norm2_input": e * rep,
        "mlp_input": e * rep,
        "mlp_hidden": (2 if m.gated else 1) * e * s * b * f / tp,
        "mlp_act_out": e * s * b * f / tp,
        "mlp_dropout_mask": rep if hd else 0.0,
    }
    if flash:
        t["core_logsumexp"] = 4.0 * a_r * s * b
    else:
        t["core_softmax"] = e * a_r * s * s * b
        t["core_dropout"] = (e + 1) * a_r * s * s * b if ad else 0.0
    return t


def layer_activation_bytes(m: ModelConfig, tp: int, seq_len: int, micro_batch: int, sequence_parallel: bool = True,
                           flash: bool = True, dtype: str = "bf16", recompute: str = "none") -> float:
    """One layer, one microbatch: all terms (none), all but the attention core (selective), or
    only the layer input (full: 2sbh, /t with SP)."""
    t = layer_activation_terms(m, tp, seq_len, micro_batch, sequence_parallel, flash, dtype)
    if recompute == "full":
        return t["norm1_input"]
    if recompute == "selective":
        return sum(v for k, v in t.items() if not k.startswith("core_"))
    return sum(t.values())


def in_flight(pp: int, vp: int, num_microbatches: int, rank: int) -> float:
    """Microbatches whose activations pp rank `rank` holds at its peak, in units of all its layers.

    1F1B: rank r holds min(pp - r, m). Interleaved (vp > 1, Narayanan et al. 2021): rank r runs
    2(pp-r-1) + (vp-1)pp + 1 chunk-forwards before its first backward, each chunk being 1/vp of
    its layers; for rank 0 that is pp(1 + (pp-1)/(pp*vp)) stage-equivalents. Capped at m.
    """
    if vp == 1:
        return float(min(pp - rank, num_microbatches))
    chunks = 2 * (pp - rank - 1) + (vp - 1) * pp + 1
    return min(chunks, num_microbatches * vp) / vp


def memory_per_rank(m: ModelConfig, layout: Layout, dtype: str = "bf16", distributed_optimizer: bool = True,
                    recompute: str = "none", recompute_num_layers: int | None = None, flash: bool = True,
                    dp_mode: str | None = None) -> dict:
    """Bytes on the most loaded GPU of `layout`: weights, grads, optimizer, activations, total,
    params_on_rank; also params_per_rank (every pp rank), pp_rank (the most loaded), in_flight,
    layers and the activation terms.

    Activations of pp rank r = in_flight(r) x (its layers' per-microbatch bytes), where with full
    recompute `recompute_num_layers` layers per chunk (None = all) keep only their input and the
    rest keep everything; full recompute adds one layer's complete activations as working memory
    (the layer being recomputed in backward). The first stage adds the embedding-dropout mask per
    in-flight microbatch (the embedding output itself is layer 0's input, already counted); the
    last stage adds, for the one microbatch whose loss is live, the final-norm input, the LM-head
    input and the fp32 logits s*b*padded_vocab/t*4 kept by the vocab-parallel cross-entropy.
    dp_mode zero3 (optim/zero3.py) adds the gathered units to the weights: two layers (the one running
    and the one prefetched) and the stage's root (embedding, final norm, head), whole, in the dtype.
    """
    layout.validate(m)
    check_choice("train.dtype", dtype, tuple(DTYPES))
    check_choice("train.recompute", recompute, RECOMPUTE)
    tp, pp, vp, dp, sp = layout.tp, layout.pp, layout.vp, layout.dp, layout.sp
    seq_len, micro_batch, num_microbatches = layout.seq_len, layout.micro_batch, layout.num_microbatches
    e = DTYPES[dtype].itemsize
    cp = layout.cp
    per_param = bytes_per_param(dtype, dp * cp, distributed_optimizer, dp_mode)   # shards span dp x cp
    seq_len, flash = seq_len // cp, flash or cp > 1             # this rank's tokens; the ring keeps no s^2
    params, experts = params_per_rank(m, layout), params_per_rank(m, layout, experts_only=True)
    layers = layout.stage_layers(m)
    full = layer_activation_bytes(m, tp, seq_len, micro_batch, sp, flash, dtype, "none")
    stored = layer_activation_bytes(m, tp, seq_len, micro_batch, sp, flash, dtype, recompute)
    rep = seq_len * micro_batch * m.hidden_size / (tp if sp else 1)
    logits = 4.0 * seq_len * micro_batch * m.padded_vocab(tp) / tp

    best = None
    for r in range(pp):
        n_layers = layers[r]
        if recompute == "full" and recompute_num_layers is not None:
            n_rc = min(n_layers, recompute_num_layers * vp)
            per_mb = n_rc * stored + (n_layers - n_rc) * full
        else:
            per_mb = n_layers * stored
        flight = in_flight(pp, vp, num_microbatches, r)
        act = {"layers": flight * per_mb, "recompute_working": full if recompute == "full" and n_layers else 0.0,
               "embedding": flight * rep if r == 0 and m.hidden_dropout > 0 else 0.0,
               "head": 2 * e * rep + logits if r == pp - 1 else 0.0}
        weights, grads = params[r] * per_param["weights"], params[r] * per_param["grads"]
        if dp_mode == "zero3" and dp * cp > 1:
            root = params[r] - n_layers * layer_params(m, tp)
            weights += (min(2, n_layers) * layer_params(m, tp) + root) * e
        # expert weights: their optimizer state is sharded over edp = dp/ep, not dp
        optimizer = params[r] * per_param["optimizer"] + (experts[r] * per_param["optimizer"] * (layout.ep - 1)
                                                          if distributed_optimizer else 0)
        total = weights + grads + optimizer + sum(act.values())
        if best is None or total > best["total"]:
            best = {"weights": float(weights), "grads": float(grads), "optimizer": float(optimizer),
                    "activations": float(sum(act.values())), "total": float(total),
                    "params_on_rank": params[r], "params_per_rank": params, "pp_rank": r, "in_flight": flight,
                    "layers": n_layers, "layers_per_rank": layers,
                    "activation_detail": {k: float(v) for k, v in act.items()}}
    return best
