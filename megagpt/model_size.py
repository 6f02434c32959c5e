"""Parameter and FLOP counts derived from a ModelConfig: the one home of both. The memory model,
the comm model, the planner, the dry run and the training log's MFU all call these, so a layer's
parameters or FLOPs are counted in exactly one place."""
from __future__ import annotations

import math

from .config import ModelConfig

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}     # dense bf16 tensor-core peak, per GPU


def peak_for(name: str) -> float | None:
    """The dense bf16 peak of a GPU named `name` (nvidia-smi's or torch's name), None when unknown."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def device_peak_tflops(device) -> float | None:
    """MFU's denominator for `device`: the GPU's known peak; None on the CPU or an unknown GPU."""
    import torch
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_for(torch.cuda.get_device_name(device))


def layer_param_numels(m: ModelConfig, tp: int, layer_id: int = 0, ep: int = 1) -> list[tuple[int, bool]]:
    """(numel, is an expert weight) of each parameter of one layer on one TP rank, in Block's
    registration order. A MoE layer's MLP is its router [E, h], its E/ep experts' fc1 [2f, h] and
    fc2 [h, f] (stacked; whole over TP) and its optional shared expert (a TP-split SwiGLU); a MoD
    layer adds its router and predictor [1, h] each."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    qkv = (m.num_heads // tp + 2 * m.kv_heads_per_rank(tp)) * d
    norm = [h, h] if m.norm == "layernorm" else [h]
    attn = (norm + [qkv * h] + [qkv] * m.bias + [h * m.num_heads * d // tp] + [h] * m.bias
            + [m.num_heads // tp] * m.adaptive_span + norm)    # adaptive span: one per local head (variants.py)
    out = [(n, False) for n in attn]
    if m.is_moe_layer(layer_id):
        e, fe, fs = m.moe_num_experts, m.expert_ffn, m.moe_shared_expert_size
        out += [(e * h, False), (e // ep * 2 * fe * h, True), (e // ep * h * fe, True)]
        out += [(2 * fs // tp * h, False), (h * fs // tp, False)] if fs else []
    else:
        fc1 = (2 * f if m.gated else f) // tp
        out += [(n, False) for n in [fc1 * h] + [fc1] * m.bias + [h * f // tp] + [h] * m.bias]
    if layer_id in (m.mod_layers or ()):
        out += [(h, False), (h, False)]
    return out


def chunk_param_numels(m: ModelConfig, tp: int, num_layers: int, pre: bool, post: bool,
                       layer_ids: list[int] | None = None, ep: int = 1, kinds: bool = False) -> list:
    """numel of each parameter of one model chunk on one TP rank, in GPTModel's registration order:
    the one parameter count, which the per-layer, per-rank and whole-model counts sum.

    Q, the output projection and the MLP are split over tp; K and V by whole heads, or one head
    per rank when kv_heads < tp (replicated); norms and row-parallel biases are replicated. A chunk
    with the embedding (pre, or post with tied embeddings) holds a [padded_vocab/tp, h] shard;
    post adds the final norm and, untied, an LM-head shard of the same shape; pre the workspace
    vectors [n, h] (replicated) and, before everything, the multimodal adapters (replicated). layer_ids: the chunk's global layers (default: the first num_layers;
    they matter for MoE and MoD layers); ep: the experts are split over ep ranks. kinds: (numel, is an
    expert weight) pairs instead."""
    from .multimodal.adapters import adapter_param_numels
    h = m.hidden_size
    norm = [h, h] if m.norm == "layernorm" else [h]
    emb = m.padded_vocab(tp) // tp * h
    out = [(n, False) for n in adapter_param_numels(m)] if pre else []    # multimodal adapters, registered first
    out += [(emb, False)] if pre or (post and m.tie_embeddings) else []
    out += [(m.workspace_tokens * h, False)] if pre and m.workspace_tokens else []   # workspace vectors (variants.py)
    for i in (range(num_layers) if layer_ids is None else layer_ids):
        out += layer_param_numels(m, tp, i, ep)
    if post:
        out += [(n, False) for n in norm + ([] if m.tie_embeddings else [emb])]
    return out if kinds else [n for n, _ in out]


def layer_params(m: ModelConfig, tp: int = 1, layer_id: int = 0, ep: int = 1) -> int:
    """One transformer layer's parameters on one TP rank."""
    return sum(n for n, _ in layer_param_numels(m, tp, layer_id, ep))


def count_params(m: ModelConfig) -> int:
    """Parameters of the unpadded, unsharded model (what a paper would quote); every expert counts."""
    padding = (m.padded_vocab(1) - m.vocab_size) * m.hidden_size * (1 if m.tie_embeddings else 2)
    return sum(chunk_param_numels(m, 1, m.num_layers, True, True)) - padding


def active_params(m: ModelConfig) -> int:
    """Parameters one token uses: count_params with top_k of the E experts of each MoE layer
    (the MoD routers and predictors count whole)."""
    experts = sum(n for i in range(m.num_layers) for n, expert in layer_param_numels(m, 1, i) if expert)
    return count_params(m) - experts + experts * m.moe_top_k // max(1, m.moe_num_experts)


def layer_flops(m: ModelConfig, seq_len: int, tp: int = 1, causal: bool = True,
                layer_id: int = 0) -> tuple[float, float]:
    """Forward FLOPs per token of one transformer layer on one TP rank: (matmuls, attention scores
    and values). causal: the masked half is skipped (flash attention), else all s^2 scores.
    A MoE layer's MLP is its router and top_k experts (and its shared expert): its tokens are split
    over TP by sequence parallelism (MoE with TP assumes SP, as Megatron requires).
    A mixture-of-depths layer (model.mod_layers) runs its block on mod_capacity c of the tokens, which
    attend among themselves (c * s keys): per token of the sequence, c of the matmuls and c^2 of the
    attention, plus its router and predictor (h each; the predictor only in training, counted anyway)."""
    h, d = m.hidden_size, m.head_dim
    q, kv = m.num_heads // tp, m.kv_heads_per_rank(tp)
    if m.is_moe_layer(layer_id):
        mlp = (m.moe_num_experts * h + m.moe_top_k * 3 * h * m.expert_ffn) / tp + 3 * h * m.moe_shared_expert_size // tp
    else:
        mlp = (3 if m.gated else 2) * h * m.ffn_hidden_size // tp
    matmul = 2 * (h * (q + 2 * kv) * d + q * d * h + mlp)
    attention = 2 * 2 * q * d * (seq_len / 2 if causal else seq_len)
    if layer_id in (m.mod_layers or ()):
        c = math.ceil(m.mod_capacity * seq_len) / seq_len       # the kept fraction (mod.mod_keep's k / s)
        return c * matmul + 2 * 2 * h, c * c * attention
    return matmul, attention


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention scores
    (MoE layers: the active experts only; MoD layers: their kept tokens)."""
    layers = sum(sum(layer_flops(m, seq_len, layer_id=i)) for i in range(m.num_layers))
    return 3.0 * (layers + 2 * m.hidden_size * m.vocab_size)
