"""The map between a megagpt MoE model and the Hugging Face Mixtral format (the Hub's file layout), both ways.

Mixtral is Llama with every MLP a mixture of experts: a softmax router over E experts, the top k
renormalised, E SwiGLU experts, no shared expert, dropless. Everything but the MLP maps as in hf.py;
the MLP of layer i (megagpt -> HF, the per-expert names of the Hub's files, which transformers 5.x
fuses on load):
  layers.i.mlp.router.weight [E, h]           -> model.layers.i.block_sparse_moe.gate.weight
  layers.i.mlp.experts.fc1.weight [E, 2f, h]  -> ...block_sparse_moe.experts.j.w1.weight (gate, [f, h])
                                                 ...block_sparse_moe.experts.j.w3.weight (up,   [f, h])
  layers.i.mlp.experts.fc2.weight [E, h, f]   -> ...block_sparse_moe.experts.j.w2.weight (down, [h, f])
Pure functions on global tensors, one megagpt tensor at a time (the experts of one layer at once).
"""
from __future__ import annotations

import re

import torch

from ..config import ModelConfig
from .hf import ConversionError, GetTensor, from_hf_config, hf_to_megagpt, megagpt_names, megagpt_to_hf, to_hf_config

_MOE = re.compile(r"layers\.(\d+)\.mlp\.(router\.weight|experts\.fc1\.weight|experts\.fc2\.weight)")


def check_mixtral(cfg: ModelConfig) -> None:
    """Raise ConversionError naming the field Mixtral cannot express."""
    rules = [("moe_num_experts", cfg.moe_num_experts > 0, "Mixtral needs experts"),
             ("moe_layers", all(cfg.is_moe_layer(i) for i in range(cfg.num_layers)), "Mixtral has a MoE MLP in every layer"),
             ("moe_router_score", cfg.moe_router_score == "softmax", "Mixtral's router is a softmax"),
             ("moe_router_norm_topk", cfg.moe_router_norm_topk, "Mixtral renormalises the top-k"),
             ("moe_shared_expert_size", cfg.moe_shared_expert_size == 0, "Mixtral has no shared expert"),
             ("moe_capacity_factor", cfg.moe_capacity_factor is None, "Mixtral is dropless"),
             ("moe_router_bias_rate", not cfg.moe_router_bias_rate, "Mixtral's router has no selection bias"),
             ("mlp", cfg.mlp == "swiglu", "Mixtral's experts are SwiGLU"),
             ("mod_layers", not cfg.mod_layers, "Mixtral has no mixture of depths")]
    for name, ok, why in rules:
        if not ok:
            raise ConversionError(f"model.{name}: {why}; {getattr(cfg, name)!r} has no HF Mixtral equivalent")


def to_mixtral_config(cfg: ModelConfig) -> dict:
    check_mixtral(cfg)
    out = to_hf_config(cfg)
    out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=cfg.expert_ffn,
               num_local_experts=cfg.moe_num_experts, num_experts_per_tok=cfg.moe_top_k,
               router_aux_loss_coef=cfg.moe_aux_loss_coeff, sliding_window=None, router_jitter_noise=0.0)
    for f in ("mlp_bias", "attention_bias"):
        if out.pop(f):
            raise ConversionError("model.bias: Mixtral has no biases")
    return out


def from_mixtral_config(hf: dict, **overrides) -> ModelConfig:
    if (hf.get("architectures") or [None])[0] != "MixtralForCausalLM":
        raise ConversionError(f"architectures: {hf.get('architectures')!r} is not MixtralForCausalLM")
    llama = dict(hf, architectures=["MistralForCausalLM"], sliding_window=hf.get("sliding_window"))
    base = from_hf_config(llama, ffn_hidden_size=hf["intermediate_size"], **overrides)
    return ModelConfig(**{**base.__dict__, "moe_num_experts": hf["num_local_experts"],
                          "moe_top_k": hf.get("num_experts_per_tok", 2), "moe_router_norm_topk": True,
                          "moe_aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0)), **overrides})


def _moe_names(i: int, kind: str, experts: int) -> list[str]:
    p = f"model.layers.{i}.block_sparse_moe."
    if kind == "router.weight":
        return [p + "gate.weight"]
    ws = ("w1", "w3") if kind == "experts.fc1.weight" else ("w2",)
    return [f"{p}experts.{j}.{w}.weight" for j in range(experts) for w in ws]


def megagpt_to_mixtral(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    m = _MOE.fullmatch(name)
    if m is None:
        return megagpt_to_hf(name, tensor, cfg)
    i, kind = int(m.group(1)), m.group(2)
    names = _moe_names(i, kind, cfg.moe_num_experts)
    if kind == "router.weight":
        return [(names[0], tensor)]
    if kind == "experts.fc1.weight":                                   # [E, 2f, h] -> (gate, up) per expert
        pieces = [half for e in tensor.unbind(0) for half in e.chunk(2, dim=0)]
    else:
        pieces = list(tensor.unbind(0))
    return list(zip(names, pieces))


def mixtral_to_megagpt(name: str, get_tensor: GetTensor, cfg: ModelConfig, tp: int = 1) -> torch.Tensor:
    m = _MOE.fullmatch(name)
    if m is None:
        return hf_to_megagpt(name, get_tensor, cfg, tp)
    i, kind = int(m.group(1)), m.group(2)
    names = _moe_names(i, kind, cfg.moe_num_experts)
    if kind == "router.weight":
        return get_tensor(names[0])
    if kind == "experts.fc1.weight":
        return torch.stack([torch.cat([get_tensor(g), get_tensor(u)]) for g, u in zip(names[::2], names[1::2])])
    return torch.stack([get_tensor(n) for n in names])


def mixtral_names(cfg: ModelConfig) -> list[str]:
    """megagpt's global names for a Mixtral-shaped model (the dense MLP names swapped for the MoE ones)."""
    out = []
    for n in megagpt_names(cfg):
        if n.endswith("mlp.fc1.weight"):
            i = n.split(".")[1]
            out += [f"layers.{i}.mlp.router.weight", f"layers.{i}.mlp.experts.fc1.weight",
                    f"layers.{i}.mlp.experts.fc2.weight"]
        elif not n.endswith("mlp.fc2.weight"):
            out.append(n)
    return out
