"""The map between megagpt's global tensors and the Hugging Face Llama format, both ways.

Pure functions on global (unsharded) tensors, one megagpt tensor at a time, so a conversion
streams: memory holds one fused tensor and its HF pieces, never the whole model.

Layouts (megagpt -> HF):
  embedding.weight [padded_vocab, h]      -> model.embed_tokens.weight [vocab, h] (padding stripped)
  layers.i.attention.qkv.weight [Q; K; V] -> model.layers.i.self_attn.{q,k,v}_proj.weight
  layers.i.attention.proj.weight          -> model.layers.i.self_attn.o_proj.weight
  layers.i.mlp.fc1.weight [gate; up]      -> model.layers.i.mlp.{gate,up}_proj.weight
  layers.i.mlp.fc2.weight                 -> model.layers.i.mlp.down_proj.weight
  layers.i.norm1 / norm2 / final_norm     -> input_layernorm / post_attention_layernorm / model.norm
  lm_head.weight (untied only)            -> lm_head.weight
  reward_head [1, h] (align/reward.py)    -> score.weight (LlamaForSequenceClassification, num_labels=1)
  value_head [1, h] (align/ppo.py)        -> value_head.weight in value_head.safetensors (HF has no value head)
HF rotates Q and K by "rotate half" (dim j pairs with j + d/2). A model trained with
`rope_interleaved` pairs 2j with 2j+1 instead; its Q and K rows are permuted per head (even dims,
then odd dims) so that HF's pairing meets the same numbers. Q and K get the same permutation, so
q.k, and the attention scores, are unchanged.

Llama, Mistral (no sliding window in effect) and Qwen2 import. Qwen2 has biases on q/k/v only;
megagpt's `bias` is all-or-nothing, so it imports as bias=True with zero o_proj and MLP biases:
the same function at import (those biases then train; an export writes a Llama with all biases).
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterator

import torch

from ..config import ModelConfig
from ..model.rope import SCALING_TYPES, YARN_BETA_FAST, YARN_BETA_SLOW

GetTensor = Callable[[str], torch.Tensor]


class ConversionError(ValueError):
    """The model or checkpoint cannot be mapped; the one-line message names the field or tensor."""


# ----------------------------------------------------------------------------- configs

# What HF assumes when a config.json omits a field, per architecture (from each LlamaConfig-like class).
_ARCH_DEFAULTS = {
    "LlamaForCausalLM": dict(num_key_value_heads=None, max_position_embeddings=2048, sliding_window=None),
    "MistralForCausalLM": dict(num_key_value_heads=8, max_position_embeddings=4096 * 32, sliding_window=4096),
    "Qwen2ForCausalLM": dict(num_key_value_heads=32, max_position_embeddings=32768, sliding_window=None),
}
_ACTS = {"swiglu": "silu", "geglu": "gelu"}        # F.gelu is the exact (erf) GELU, HF's "gelu"


def to_hf_config(cfg: ModelConfig) -> dict:
    """LlamaConfig fields for this model. Raises ConversionError for what Llama cannot express."""
    if cfg.mlp not in _ACTS:
        raise ConversionError(f"model.mlp: Llama has a gated MLP; {cfg.mlp!r} has no HF Llama equivalent")
    if cfg.norm != "rmsnorm":
        raise ConversionError(f"model.norm: Llama uses RMSNorm; {cfg.norm!r} has no HF Llama equivalent")
    if cfg.rotary_fraction != 1.0:
        raise ConversionError(f"model.rotary_fraction: Llama rotates whole heads; {cfg.rotary_fraction} "
                              f"has no HF Llama equivalent")
    if cfg.attention_window is not None:
        raise ConversionError(f"model.attention_window: Llama attends to the whole context; a window of "
                              f"{cfg.attention_window} has no HF Llama equivalent")
    if cfg.workspace_tokens or cfg.adaptive_span:
        field = "model.workspace_tokens" if cfg.workspace_tokens else "model.adaptive_span"
        raise ConversionError(f"{field}: Llama has no workspace tokens or learned attention spans; this model "
                              f"cannot be exported to HF")
    rope = _rope_to_hf(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": _ACTS[cfg.mlp],
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_std,
        # transformers 5.x reads rope_parameters; 4.x reads rope_theta and rope_scaling
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": ({k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling != 1.0 else None),
    }


def _rope_to_hf(cfg: ModelConfig) -> dict:
    """The HF rope parameters of this model's RoPE and its scaling (model/rope.py)."""
    if cfg.rope_scaling == 1.0:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope = {"rope_type": cfg.rope_scaling_type, "factor": cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_type == "yarn":
        rope.update(original_max_position_embeddings=cfg.rope_original_len, beta_fast=YARN_BETA_FAST,
                    beta_slow=YARN_BETA_SLOW, truncate=True)
    return rope


def _rope_from_hf(hf: dict, max_len: int) -> tuple[float, float, str]:
    """(theta, factor, scaling type) from either the 5.x `rope_parameters` or the 4.x `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"partial_rotary_factor: {partial} is not supported (Llama rotates whole heads)")
    if kind == "default":
        return theta, 1.0, "linear"
    if kind not in SCALING_TYPES:
        raise ConversionError(f"rope_parameters.rope_type: {kind!r} is not supported (default, linear or yarn)")
    factor = float(params["factor"])
    if kind == "yarn":  # megagpt's YaRN: the paper's defaults, L = max_position_embeddings / factor
        fixed = dict(beta_fast=YARN_BETA_FAST, beta_slow=YARN_BETA_SLOW, truncate=True,
                     original_max_position_embeddings=max(1, round(max_len / factor)))
        for key, want in fixed.items():
            if params.get(key) not in (None, want):
                raise ConversionError(f"rope_parameters.{key}: {params[key]} is not supported (yarn with "
                                      f"max_position_embeddings={max_len}, factor={factor} needs {want})")
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                raise ConversionError(f"rope_parameters.{key}: not supported (yarn's attention factor is "
                                      f"0.1*ln(factor)+1)")
    return theta, factor, kind


def _bias_flags(hf: dict) -> tuple[bool, bool, bool]:
    """Which HF tensors carry a bias: (q/k/v, o_proj, MLP)."""
    if (hf.get("architectures") or [None])[0] == "Qwen2ForCausalLM":
        return True, False, False
    attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    return attn, attn, mlp


def from_hf_config(hf: dict, **overrides) -> ModelConfig:
    """A ModelConfig from an HF config.json dict (Llama, Mistral, Qwen2); `overrides` set megagpt-only
    fields such as make_vocab_divisible_by. Raises ConversionError naming the unsupported field."""
    archs = hf.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else archs
    if arch not in _ARCH_DEFAULTS:
        raise ConversionError(f"architectures: {arch!r} is not supported "
                              f"(supported: {', '.join(_ARCH_DEFAULTS)})")
    d = {**_ARCH_DEFAULTS[arch], **hf}
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if d.get(f) is None:
            raise ConversionError(f"{f}: missing from the {arch} config")
    act = d.get("hidden_act", "silu")
    mlp = {v: k for k, v in _ACTS.items()}.get(act)
    if mlp is None:
        raise ConversionError(f"hidden_act: {act!r} is not supported (silu or gelu)")
    heads = d["num_attention_heads"]
    if d.get("head_dim") not in (None, d["hidden_size"] // heads):
        raise ConversionError(f"head_dim: {d['head_dim']} differs from hidden_size/num_attention_heads="
                              f"{d['hidden_size'] // heads}; megagpt derives head_dim from hidden_size")
    window = d.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not d.get("use_sliding_window", False):
        window = None
    if window is not None and window < d["max_position_embeddings"]:
        raise ConversionError(f"sliding_window: {window} < max_position_embeddings="
                              f"{d['max_position_embeddings']}; megagpt has no sliding-window attention")
    theta, scaling, scaling_type = _rope_from_hf(d, d["max_position_embeddings"])
    cfg = dict(
        vocab_size=d["vocab_size"], max_seq_len=d["max_position_embeddings"], hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads, ffn_hidden_size=d["intermediate_size"],
        mlp=mlp, norm="rmsnorm", norm_eps=float(d.get("rms_norm_eps", 1e-6)), rotary_fraction=1.0,
        rope_theta=theta, rope_scaling=scaling, rope_scaling_type=scaling_type, rope_interleaved=False,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), bias=any(_bias_flags(d)),
        attention_dropout=float(d.get("attention_dropout", 0.0) or 0.0),
    )
    from ..multimodal.hf_adapters import multimodal_fields   # an export of a multimodal model (its own key)
    cfg.update(multimodal_fields(d))
    cfg.update(overrides)
    return ModelConfig(**cfg)


# ----------------------------------------------------------------------------- RoPE layouts

def rope_permutation(head_dim: int, rot_dim: int) -> torch.Tensor:
    """Index order that takes one head's rows from interleaved pairs (2j, 2j+1) to rotate-half pairs
    (j, j + rot/2): the even rotated dims, then the odd ones, then the dims RoPE leaves alone.
    `rotate_half_rows = interleaved_rows[perm]`."""
    return torch.cat([torch.arange(0, rot_dim, 2), torch.arange(1, rot_dim, 2), torch.arange(rot_dim, head_dim)])


def _permute_heads(t: torch.Tensor, heads: int, perm: torch.Tensor) -> torch.Tensor:
    """Apply one head's row permutation to every head of a [heads*d, ...] weight or [heads*d] bias."""
    d = t.shape[0] // heads
    return t.reshape(heads, d, *t.shape[1:])[:, perm].reshape(t.shape)


def _rope_perms(cfg: ModelConfig):
    """(to_hf, to_megagpt) row permutations of one head, or None when the layouts already agree."""
    if not cfg.rope_interleaved:
        return None
    perm = rope_permutation(cfg.head_dim, int(cfg.head_dim * cfg.rotary_fraction))
    return perm, torch.argsort(perm)


# ----------------------------------------------------------------------------- names

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_LAYER_MAP = {  # megagpt suffix -> HF suffix, for the tensors that map one to one
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "attention.proj.weight": "self_attn.o_proj.weight",
    "attention.proj.bias": "self_attn.o_proj.bias",
    "mlp.fc2.weight": "mlp.down_proj.weight",
    "mlp.fc2.bias": "mlp.down_proj.bias",
}
_FUSED = {  # megagpt suffix -> the HF suffixes it concatenates, in row order
    "attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.fc1": ("mlp.gate_proj", "mlp.up_proj"),
}


HEADS = {"reward_head": "score.weight", "value_head": "value_head.weight"}   # the post-training heads
VALUE_HEAD_FILE = "value_head.safetensors"


def megagpt_names(cfg: ModelConfig) -> list[str]:
    """Every global parameter name of the model, in module order (what build_model's state dict has)."""
    from ..multimodal.hf_adapters import adapter_names      # the multimodal adapters come first
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    names = adapter_names(cfg) + ["embedding.weight"]
    for i in range(cfg.num_layers):
        names.append(f"layers.{i}.norm1.weight")
        names += [f"layers.{i}.attention.{m}.{k}" for m in ("qkv", "proj") for k in kinds]
        names.append(f"layers.{i}.norm2.weight")
        names += [f"layers.{i}.mlp.{m}.{k}" for m in ("fc1", "fc2") for k in kinds]
    names.append("final_norm.weight")
    if not cfg.tie_embeddings:
        names.append("lm_head.weight")
    return names


def hf_names_for(name: str, cfg: ModelConfig) -> list[str]:
    """The HF tensors that one megagpt tensor becomes ([] for a tied lm_head)."""
    if name == "embedding.weight":
        return ["model.embed_tokens.weight"]
    if name == "final_norm.weight":
        return ["model.norm.weight"]
    if name == "lm_head.weight":
        return [] if cfg.tie_embeddings else ["lm_head.weight"]
    if name in HEADS:
        return [HEADS[name]]
    m = _LAYER.fullmatch(name)
    if m:
        i, rest = m.groups()
        if rest in _LAYER_MAP:
            return [f"model.layers.{i}.{_LAYER_MAP[rest]}"]
        module, _, kind = rest.rpartition(".")
        if module in _FUSED:
            return [f"model.layers.{i}.{part}.{kind}" for part in _FUSED[module]]
    raise ConversionError(f"{name}: no Hugging Face Llama equivalent")


def _split_sizes(name: str, cfg: ModelConfig) -> list[int]:
    d = cfg.head_dim
    if ".attention.qkv." in name:
        return [cfg.num_heads * d, cfg.kv_heads * d, cfg.kv_heads * d]
    if not cfg.gated:
        raise ConversionError(f"{name}: model.mlp={cfg.mlp!r} has no gate/up pair to split")
    return [cfg.ffn_hidden_size, cfg.ffn_hidden_size]


# ----------------------------------------------------------------------------- tensors

def megagpt_to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One global megagpt tensor -> its HF (name, tensor) pairs."""
    hf_names = hf_names_for(name, cfg)
    if name in ("embedding.weight", "lm_head.weight"):
        if tensor.shape[0] < cfg.vocab_size:
            raise ConversionError(f"{name}: {tensor.shape[0]} rows, fewer than vocab_size={cfg.vocab_size}")
        return [(n, tensor[: cfg.vocab_size]) for n in hf_names]
    if len(hf_names) == 1:
        return [(hf_names[0], tensor)]
    sizes = _split_sizes(name, cfg)
    if tensor.shape[0] != sum(sizes):
        raise ConversionError(f"{name}: {tensor.shape[0]} rows, expected {sum(sizes)} ({' + '.join(map(str, sizes))})")
    pieces = list(tensor.split(sizes, dim=0))
    perms = _rope_perms(cfg)
    if perms is not None and ".attention.qkv." in name:
        pieces[0] = _permute_heads(pieces[0], cfg.num_heads, perms[0])
        pieces[1] = _permute_heads(pieces[1], cfg.kv_heads, perms[0])
    return list(zip(hf_names, pieces))


def _zero_bias(hf_name: str, cfg: ModelConfig, hf_config: dict | None) -> bool:
    """True for a bias that megagpt has but the HF architecture lacks (imported as zeros)."""
    if not hf_name.endswith(".bias") or hf_config is None:
        return False
    qkv, o, mlp = _bias_flags(hf_config)
    if "self_attn.o_proj" in hf_name:
        return not o
    return not (qkv if "self_attn." in hf_name else mlp)


def hf_shapes(cfg: ModelConfig, hf_config: dict | None = None) -> dict[str, tuple]:
    """Every tensor an HF checkpoint of this model holds, with its shape: to check a directory before
    reading it. Written from the Llama layout directly (not through the map above), so it also
    cross-checks the map. With hf_config, the biases its architecture lacks are left out."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    q, kv = cfg.num_heads * d, cfg.kv_heads * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        rows = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv, "self_attn.o_proj": h,
                "mlp.gate_proj": f, "mlp.up_proj": f, "mlp.down_proj": h}
        cols = {"self_attn.o_proj": q, "mlp.down_proj": f}
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (h,)
        for m, n in rows.items():
            out[f"{p}{m}.weight"] = (n, cols.get(m, h))
            if cfg.bias:
                out[f"{p}{m}.bias"] = (n,)
    return {k: s for k, s in out.items() if not _zero_bias(k, cfg, hf_config)}


def hf_to_megagpt(name: str, get_tensor: GetTensor, cfg: ModelConfig, tp: int = 1,
                  hf_config: dict | None = None) -> torch.Tensor:
    """The global megagpt tensor `name`, read from its HF pieces through get_tensor(hf_name).

    Vocab rows are zero-padded to cfg.padded_vocab(tp). With hf_config given, biases that its
    architecture lacks (Qwen2's o_proj and MLP) come back as zeros instead of being read."""
    if name == "lm_head.weight" and cfg.tie_embeddings:
        raise ConversionError("lm_head.weight: the model ties embeddings; it has no separate lm_head")
    pieces = []
    for n in hf_names_for(name, cfg):
        pieces.append(None if _zero_bias(n, cfg, hf_config) else get_tensor(n))
    if name in ("embedding.weight", "lm_head.weight"):
        t = pieces[0]
        if t.shape[0] != cfg.vocab_size:
            raise ConversionError(f"{hf_names_for(name, cfg)[0]}: {t.shape[0]} rows, expected vocab_size="
                                  f"{cfg.vocab_size}")
        pad = cfg.padded_vocab(tp) - cfg.vocab_size
        return torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else t
    if len(pieces) == 1:
        if pieces[0] is None:
            return torch.zeros(cfg.hidden_size)          # o_proj or down_proj bias: [h]
        return pieces[0]
    sizes = _split_sizes(name, cfg)
    pieces = [torch.zeros(n) if p is None else p for p, n in zip(pieces, sizes)]
    for hf_name, p, n in zip(hf_names_for(name, cfg), pieces, sizes):
        if p.shape[0] != n:
            raise ConversionError(f"{hf_name}: {p.shape[0]} rows, expected {n}")
    perms = _rope_perms(cfg)
    if perms is not None and ".attention.qkv." in name:
        pieces[0] = _permute_heads(pieces[0], cfg.num_heads, perms[1])
        pieces[1] = _permute_heads(pieces[1], cfg.kv_heads, perms[1])
    return torch.cat(pieces, dim=0)


def iter_megagpt_to_hf(named_tensors, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(megagpt name, global tensor) pairs -> HF (name, tensor) pairs, one tensor at a time."""
    for name, tensor in named_tensors:
        yield from megagpt_to_hf(name, tensor, cfg)


def iter_hf_to_megagpt(get_tensor: GetTensor, cfg: ModelConfig, tp: int = 1, *, hf_config: dict | None = None,
                       names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(megagpt name, global tensor) for every parameter (or just `names`, e.g. one pipeline stage's),
    reading each HF tensor lazily when its megagpt tensor is built."""
    for name in names if names is not None else megagpt_names(cfg):
        yield name, hf_to_megagpt(name, get_tensor, cfg, tp, hf_config)


@torch.no_grad()
def load_hf_into_model(model, get_tensor: GetTensor, hf_config: dict | None = None) -> None:
    """Fill a (possibly TP-sharded, possibly one pipeline stage of a) GPTModel from HF tensors."""
    from ..multimodal.hf_adapters import is_adapter
    tp = model.tp
    params = {n: p for n, p in model.named_parameters() if not is_adapter(n)}   # the LM's tensors only
    for name, full in iter_hf_to_megagpt(get_tensor, model.cfg, tp.size, hf_config=hf_config, names=list(params)):
        p = params[name]
        shape = tuple(p.meta.global_shape)
        if tuple(full.shape) != shape:
            raise ConversionError(f"{name}: converted shape {tuple(full.shape)} != model's {shape}")
        p.copy_(p.meta.spec.shard(full, tp.rank, tp.size))


# ----------------------------------------------------------------------------- files

def open_hf_checkpoint(path: str) -> tuple[dict, GetTensor, Callable[[], None]]:
    """(config dict, get_tensor, close) for an HF model directory (hf_files.HFDirectory's three calls)."""
    from .hf_files import HFDirectory
    directory = HFDirectory(path)
    return directory.config, directory.get, directory.close


def write_hf_tokenizer(out_dir: str, tokenizer_json: str, cfg: ModelConfig, eos_token: str = "<|endoftext|>"):
    """Copy a tokenizers tokenizer.json into an HF model directory with a minimal tokenizer_config.json,
    so AutoTokenizer loads it offline. A tokenizer with the chat tokens (SFT, DPO, PPO, reward models)
    gets the chat template (align/chat.py CHAT_TEMPLATE). The eos token is also the pad token: HF's
    sequence classification scores the last token that is not padding. Returns the eos token's id
    (None when it has no such token) and the end-of-turn token's (None without a chat template)."""
    from tokenizers import Tokenizer

    from ..align.chat import CHAT_TEMPLATE, CHAT_TOKENS, END_TOKEN
    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # noqa: BLE001 -- tokenizers raises a bare Exception on a bad file
        raise ConversionError(f"{tokenizer_json}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        raise ConversionError(f"{tokenizer_json}: {n} tokens, more than model.vocab_size={cfg.vocab_size}")
    with open(tokenizer_json, "rb") as src, open(os.path.join(out_dir, "tokenizer.json"), "wb") as dst:
        dst.write(src.read())
    eos = tok.token_to_id(eos_token)
    chat = all(tok.token_to_id(t) is not None for t in CHAT_TOKENS)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
              "clean_up_tokenization_spaces": False,
              **({"eos_token": eos_token, "pad_token": eos_token} if eos is not None else {}),
              **({"chat_template": CHAT_TEMPLATE} if chat else {})}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return eos, tok.token_to_id(END_TOKEN) if chat else None
