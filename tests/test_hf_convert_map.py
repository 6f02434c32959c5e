"""The HF mapping piece by piece: QKV and gate/up layouts, vocab padding, tying, the RoPE row
permutation, config acceptance and rejection, HF directories, and import into a TP-sharded model."""
import json

import pytest
import torch
from safetensors.torch import save_file

from dist import spawn
from megagpt.checkpoint.hf import (ConversionError, from_hf_config, hf_names_for, hf_to_megagpt,
                                   iter_hf_to_megagpt, iter_megagpt_to_hf, load_hf_into_model, megagpt_names,
                                   megagpt_to_hf, open_hf_checkpoint, rope_permutation, to_hf_config)
from megagpt.config import ModelConfig
from megagpt.model.gpt import build_model
from megagpt.model.rope import apply_rope, rope_tables
from megagpt.parallel.state import ParallelState

BASE = dict(vocab_size=1001, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
            ffn_hidden_size=96, make_vocab_divisible_by=8, use_flash_attn=False)


def cfg_of(**over) -> ModelConfig:
    return ModelConfig(**{**BASE, **over})


def rows(n: int, cols: int = 3) -> torch.Tensor:
    """A tensor whose row r holds r: where each row went is readable from its values."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, cols).contiguous()


# ----------------------------------------------------------------------------- layouts

def test_gqa_qkv_split():
    cfg = cfg_of()                                     # 8 query heads, 2 KV heads, head_dim 8
    out = dict(megagpt_to_hf("layers.1.attention.qkv.weight", rows(96), cfg))
    p = "model.layers.1.self_attn."
    assert list(out) == [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"]
    assert torch.equal(out[p + "q_proj.weight"], rows(96)[:64])
    assert torch.equal(out[p + "k_proj.weight"], rows(96)[64:80])
    assert torch.equal(out[p + "v_proj.weight"], rows(96)[80:])
    back = hf_to_megagpt("layers.1.attention.qkv.weight", out.__getitem__, cfg)
    assert torch.equal(back, rows(96))


def test_mqa_qkv_split():
    cfg = cfg_of(multi_query=True)
    out = dict(megagpt_to_hf("layers.0.attention.qkv.weight", rows(80), cfg))
    assert [t.shape[0] for t in out.values()] == [64, 8, 8]


def test_swiglu_gate_up_split_computes_the_same_mlp():
    cfg = cfg_of()
    w1, w2 = torch.randn(192, 64), torch.randn(64, 96)
    out = dict(megagpt_to_hf("layers.0.mlp.fc1.weight", w1, cfg) + megagpt_to_hf("layers.0.mlp.fc2.weight", w2, cfg))
    p = "model.layers.0.mlp."
    x = torch.randn(5, 64)
    gate, up = (x @ w1.t()).chunk(2, dim=-1)             # megagpt's MLP
    ours = (torch.nn.functional.silu(gate) * up) @ w2.t()
    hf = (torch.nn.functional.silu(x @ out[p + "gate_proj.weight"].t()) * (x @ out[p + "up_proj.weight"].t())) \
        @ out[p + "down_proj.weight"].t()
    torch.testing.assert_close(ours, hf)


@pytest.mark.parametrize("tp,padded", [(1, 1008), (2, 1008), (4, 1024)])
def test_vocab_padding_added_and_removed(tp, padded):
    cfg = cfg_of()                                      # 1001 tokens, a multiple of 8 * tp
    emb = torch.randn(1001, 64)
    full = hf_to_megagpt("embedding.weight", {"model.embed_tokens.weight": emb}.__getitem__, cfg, tp)
    assert full.shape == (padded, 64) and cfg.padded_vocab(tp) == padded
    assert torch.equal(full[:1001], emb) and torch.all(full[1001:] == 0)
    (name, stripped), = megagpt_to_hf("embedding.weight", full, cfg)
    assert name == "model.embed_tokens.weight" and torch.equal(stripped, emb)
    with pytest.raises(ConversionError, match="model.embed_tokens.weight: 1000 rows, expected vocab_size=1001"):
        hf_to_megagpt("embedding.weight", {"model.embed_tokens.weight": emb[:1000]}.__getitem__, cfg)


def test_tied_and_untied_names():
    untied, tied = cfg_of(), cfg_of(tie_embeddings=True)
    assert megagpt_names(untied)[-1] == "lm_head.weight" and "lm_head.weight" not in megagpt_names(tied)
    assert megagpt_names(untied) == list(build_model(untied).state_dict())
    assert megagpt_names(cfg_of(bias=True)) == list(build_model(cfg_of(bias=True)).state_dict())
    assert hf_names_for("lm_head.weight", untied) == ["lm_head.weight"]
    assert megagpt_to_hf("lm_head.weight", torch.zeros(1008, 64), tied) == []   # dropped: it is the embedding
    with pytest.raises(ConversionError, match="lm_head.weight: the model ties embeddings"):
        hf_to_megagpt("lm_head.weight", {}.__getitem__, tied)
    hf_names = {n for name in megagpt_names(tied) for n in hf_names_for(name, tied)}
    assert "lm_head.weight" not in hf_names and len(hf_names) == 2 + 9 * 2


# ----------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_permutation_turns_interleaved_into_rotate_half(fraction):
    d, s = 16, 12
    rot = int(d * fraction)
    perm = rope_permutation(d, rot)
    cos, sin = rope_tables(s, rot, 10000.0, 1.0, "cpu")
    q, k = torch.randn(s, 2, 3, d), torch.randn(s, 2, 3, d)
    # rotating permuted rows the rotate-half way == permuting the interleaved result, bit for bit
    interleaved = apply_rope(q, cos, sin, interleaved=True)
    assert torch.equal(apply_rope(q[..., perm], cos, sin, interleaved=False), interleaved[..., perm])
    # and the attention scores, what the model sees, are unchanged
    ki = apply_rope(k, cos, sin, interleaved=True)
    scores = torch.einsum("sbhd,tbhd->bhst", interleaved, ki)
    scores_hf = torch.einsum("sbhd,tbhd->bhst", apply_rope(q[..., perm], cos, sin, False),
                             apply_rope(k[..., perm], cos, sin, False))
    torch.testing.assert_close(scores_hf, scores)


def test_interleaved_export_permutes_q_and_k_rows_per_head_only():
    cfg = cfg_of(rope_interleaved=True)
    out = [t for _, t in megagpt_to_hf("layers.0.attention.qkv.weight", rows(96), cfg)]
    perm = rope_permutation(8, 8)                      # [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(out[0][:8, 0], perm.float())
    assert torch.equal(out[0][8:16, 0], 8 + perm.float())
    assert torch.equal(out[1][:, 0], torch.cat([64 + perm, 72 + perm]).float())
    assert torch.equal(out[2], rows(96)[80:])          # V is not rotated
    bias = [t for _, t in megagpt_to_hf("layers.0.attention.qkv.bias", torch.arange(96.), cfg_of(
        rope_interleaved=True, bias=True))]
    assert torch.equal(bias[0][:8], perm.float())      # the bias is added before RoPE: it moves too


# ----------------------------------------------------------------------------- configs

def test_config_round_trip():
    cfg = cfg_of(rope_scaling=4.0, rope_theta=5e5, tie_embeddings=True, norm_eps=1e-6, mlp="geglu")
    hf = to_hf_config(cfg)
    assert hf["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    assert hf["vocab_size"] == 1001 and hf["num_key_value_heads"] == 2 and hf["hidden_act"] == "gelu"
    back = from_hf_config(json.loads(json.dumps(hf)), make_vocab_divisible_by=8, use_flash_attn=False)
    assert back == cfg


@pytest.mark.parametrize("over,field", [(dict(norm="layernorm"), "model.norm"), (dict(mlp="gelu"), "model.mlp"),
                                        (dict(rotary_fraction=0.5), "model.rotary_fraction")])
def test_to_hf_config_rejects_what_llama_cannot_express(over, field):
    with pytest.raises(ConversionError, match=f"^{field}: "):
        to_hf_config(cfg_of(**over))


def _hf(arch, **over):
    return {"architectures": [arch], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, **over}


def test_mistral_and_qwen2_accepted():
    assert from_hf_config(_hf("MistralForCausalLM", sliding_window=None)).num_layers == 2
    assert from_hf_config(_hf("MistralForCausalLM", sliding_window=4096)).max_seq_len == 4096
    qwen = from_hf_config(_hf("Qwen2ForCausalLM", use_sliding_window=False, sliding_window=1024,
                              rope_theta=1e6, tie_word_embeddings=True))
    assert qwen.bias and qwen.tie_embeddings and qwen.rope_theta == 1e6
    legacy = from_hf_config(_hf("LlamaForCausalLM", rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2}))
    assert (legacy.rope_theta, legacy.rope_scaling) == (500.0, 2.0)


@pytest.mark.parametrize("hf,message", [
    (_hf("GPT2LMHeadModel"), "architectures: 'GPT2LMHeadModel' is not supported"),
    (_hf("MistralForCausalLM", sliding_window=1024), "sliding_window: 1024 < max_position_embeddings=4096"),
    # no sliding_window key: HF's Mistral default of 4096 applies
    (_hf("MistralForCausalLM", max_position_embeddings=8192), "sliding_window: 4096 < max_position_embeddings"),
    (_hf("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=512), "sliding_window: 512"),
    (_hf("LlamaForCausalLM", rope_parameters={"rope_type": "llama3", "factor": 8}), "rope_type: 'llama3'"),
    (_hf("LlamaForCausalLM", hidden_act="gelu_pytorch_tanh"), "hidden_act: 'gelu_pytorch_tanh'"),
    (_hf("LlamaForCausalLM", head_dim=16), "head_dim: 16 differs"),
    (_hf("LlamaForCausalLM", partial_rotary_factor=0.5), "partial_rotary_factor: 0.5"),
    ({k: v for k, v in _hf("LlamaForCausalLM").items() if k != "hidden_size"}, "hidden_size: missing"),
])
def test_from_hf_config_rejections(hf, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_hf_config(hf)


def test_qwen2_missing_biases_import_as_zeros():
    cfg = from_hf_config(_hf("Qwen2ForCausalLM"), make_vocab_divisible_by=1)
    hf = {"model.layers.0.self_attn.q_proj.bias": torch.ones(64), "model.layers.0.self_attn.k_proj.bias":
          torch.ones(16), "model.layers.0.self_attn.v_proj.bias": torch.ones(16)}
    conf = _hf("Qwen2ForCausalLM")
    assert torch.equal(hf_to_megagpt("layers.0.attention.qkv.bias", hf.__getitem__, cfg, hf_config=conf),
                       torch.ones(96))
    for name, n in (("attention.proj.bias", 64), ("mlp.fc1.bias", 192), ("mlp.fc2.bias", 64)):
        t = hf_to_megagpt(f"layers.0.{name}", hf.__getitem__, cfg, hf_config=conf)   # nothing is read
        assert torch.equal(t, torch.zeros(n)), name


# ----------------------------------------------------------------------------- files and TP

def _write_hf_dir(path, cfg, model, sharded: bool):
    tensors = {n: t.contiguous() for n, t in iter_megagpt_to_hf(model.state_dict().items(), cfg)}
    (path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"))
        return tensors
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(path / fname))
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_directory_round_trip(tmp_path, sharded):
    cfg = cfg_of()
    model = build_model(cfg, seed=5)
    _write_hf_dir(tmp_path, cfg, model, sharded)
    hf_config, get_tensor, close = open_hf_checkpoint(str(tmp_path))
    cfg2 = from_hf_config(hf_config, make_vocab_divisible_by=8, use_flash_attn=False)
    assert cfg2 == cfg
    for name, t in iter_hf_to_megagpt(get_tensor, cfg2):
        ref = model.state_dict()[name]
        assert torch.equal(t[: cfg.vocab_size], ref[: cfg.vocab_size]), name
    close()


def test_hf_index_naming_a_file_outside_is_refused(tmp_path):
    cfg = cfg_of()
    _write_hf_dir(tmp_path, cfg, build_model(cfg), sharded=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../evil.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _, get_tensor, _ = open_hf_checkpoint(str(tmp_path))
    with pytest.raises(ConversionError, match="model.norm.weight: not in the checkpoint's weight map"):
        get_tensor("model.norm.weight")


def _tp_import_worker(rank, world, cfg, hf_tensors, tokens):
    ps = ParallelState.create(tp=world)
    model = build_model(cfg, ps, seed=99).eval()           # a different init, overwritten by the import
    load_hf_into_model(model, hf_tensors.__getitem__)
    with torch.no_grad():
        return model.gather_logits(model(tokens))


@pytest.mark.parametrize("kv", [2, 1])
def test_import_into_tp2_matches_serial(kv):
    cfg = cfg_of(num_kv_heads=kv, rope_interleaved=True)
    serial = build_model(cfg, seed=5).eval()
    hf_tensors = dict(iter_megagpt_to_hf(serial.state_dict().items(), cfg))
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = serial.gather_logits(serial(tokens))
    out = spawn(2, _tp_import_worker, cfg, hf_tensors, tokens)
    for logits in out:
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
