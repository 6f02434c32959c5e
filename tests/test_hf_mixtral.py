"""megagpt MoE <-> Hugging Face Mixtral: a model written in the Hub's per-expert file layout loads in
transformers' MixtralForCausalLM with the same logits (fp32, 1e-4), reads back bit-exact, and what
Mixtral cannot express fails in one line."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from dist import tiny_model_cfg
from megagpt.checkpoint.hf import ConversionError
from megagpt.checkpoint.hf_files import HFDirectory
from megagpt.checkpoint.hf_mixtral import (from_mixtral_config, megagpt_to_mixtral, mixtral_names,
                                           mixtral_to_megagpt, to_mixtral_config)
from megagpt.model.gpt import build_model


def mixtral_cfg(**over):
    return tiny_model_cfg(vocab_size=256, num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4,
                          moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=40, moe_router_norm_topk=True,
                          rope_theta=10000.0, init_std=0.1, **over)


def test_mixtral_logits_and_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = mixtral_cfg()
    model = build_model(cfg, seed=3).eval()
    assert [n for n, _ in model.named_parameters()] == mixtral_names(cfg)
    tensors = {}
    for name, p in model.named_parameters():
        tensors.update({k: v.contiguous() for k, v in megagpt_to_mixtral(name, p.detach(), cfg)})
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in tensors
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    hf_config = to_mixtral_config(cfg)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    hf = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.gather_logits(model(tokens))
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # back: every tensor bit-exact, and the config
    with HFDirectory(str(tmp_path)) as d:
        back_cfg = from_mixtral_config(d.config, make_vocab_divisible_by=1, init_std=0.1)
        for name, p in model.named_parameters():
            assert torch.equal(mixtral_to_megagpt(name, d.get, back_cfg), p.detach()), name
    for f in ("moe_num_experts", "moe_top_k", "moe_router_norm_topk", "expert_ffn", "num_kv_heads", "hidden_size"):
        assert getattr(back_cfg, f) == getattr(cfg, f), f


@pytest.mark.parametrize("over, field", [(dict(moe_router_score="sigmoid"), "model.moe_router_score"),
                                         (dict(moe_layer_freq=2), "model.moe_layers"),
                                         (dict(moe_shared_expert_size=8), "model.moe_shared_expert_size"),
                                         (dict(moe_capacity_factor=1.0), "model.moe_capacity_factor"),
                                         (dict(moe_router_norm_topk=False), "model.moe_router_norm_topk")])
def test_what_mixtral_cannot_express_is_one_line(over, field):
    with pytest.raises(ConversionError) as e:
        to_mixtral_config(replace(mixtral_cfg(), **over))
    assert str(e.value).startswith(field + ": ") and "\n" not in str(e.value)


def test_converter_exports_a_moe_checkpoint_as_mixtral(tmp_path):
    """tools/convert_checkpoint.py --to hf on a MoE checkpoint writes Mixtral: transformers loads it and
    gives the model's logits (fp32, 1e-4)."""
    transformers = pytest.importorskip("transformers")
    from megagpt.checkpoint.convert import convert
    from megagpt.checkpoint.sharded import save_checkpoint
    from megagpt.parallel.state import ParallelState
    cfg = mixtral_cfg()
    model = build_model(cfg, seed=5).eval()
    save_checkpoint(str(tmp_path / "run"), 1, [model], ParallelState.single(), None, {})
    convert(str(tmp_path / "run"), str(tmp_path / "hf"), "hf")
    hf = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.gather_logits(model(tokens)), hf(tokens).logits, rtol=1e-4, atol=1e-4)
