"""RoPE context-extension scaling (model/rope.py): linear position interpolation and YaRN.

The HF logits check for a scaled model is in test_hf_reference.py (cases position-interpolation, yarn);
here: the tables against transformers' own RoPE functions, the config rules, and the HF config map."""
import json

import pytest
import torch

from megagpt.checkpoint.hf import ConversionError, from_hf_config, to_hf_config
from megagpt.config import ConfigError, ModelConfig, load_config, overlay_overrides
from megagpt.model.rope import rope_tables

MODEL = dict(vocab_size=300, max_seq_len=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=96, make_vocab_divisible_by=1, use_flash_attn=False)


@pytest.mark.parametrize("kind,factor", [("linear", 4.0), ("yarn", 4.0), ("yarn", 8.0)])
def test_tables_match_transformers_rope_init(kind, factor):
    """cos/sin equal transformers' inv_freq and attention scaling for the same HF config (fp32, 1e-6)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = ModelConfig(**MODEL, rope_theta=10000.0, rope_scaling=factor, rope_scaling_type=kind)
    hf = transformers.LlamaConfig(**to_hf_config(cfg))
    inv_freq, mult = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq.float())
    cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, factor, "cpu",
                           kind=kind, original_len=cfg.rope_original_len)
    torch.testing.assert_close(cos[:, 0, 0], angles.cos() * mult, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 0, 0], angles.sin() * mult, atol=1e-6, rtol=0)
    if kind == "yarn":   # both regimes present: the first frequency kept, the last interpolated
        plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        assert inv_freq[0] == plain[0] and torch.isclose(inv_freq[-1], plain[-1] / factor) and mult > 1


def test_linear_is_position_interpolation():
    """PI: position p at factor k has exactly the angles of position p/k unscaled."""
    cos4, _ = rope_tables(64, 16, 10000.0, 4.0, "cpu")
    cos1, _ = rope_tables(16, 16, 10000.0, 1.0, "cpu")
    torch.testing.assert_close(cos4[::4], cos1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,factor", [("linear", 4.0), ("yarn", 4.0)])
def test_hf_config_round_trip(kind, factor):
    cfg = ModelConfig(**MODEL, rope_scaling=factor, rope_scaling_type=kind)
    hf = to_hf_config(cfg)
    assert hf["rope_parameters"]["rope_type"] == kind and hf["rope_scaling"]["factor"] == factor
    assert from_hf_config(json.loads(json.dumps(hf)), make_vocab_divisible_by=1, use_flash_attn=False) == cfg
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}        # transformers 4.x fields only
    assert from_hf_config(legacy, make_vocab_divisible_by=1, use_flash_attn=False) == cfg


@pytest.mark.parametrize("params,message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type: 'dynamic' is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}, "rope_parameters.beta_fast: 16 is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
     "rope_parameters.original_max_position_embeddings: 2048 is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.0}, "rope_parameters.attention_factor: "),
])
def test_hf_import_rejects_other_scalings(params, message):
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 4096,
          "rope_parameters": {"rope_theta": 10000.0, **params}}
    with pytest.raises(ConversionError, match="^" + message.replace("(", r"\(")):
        from_hf_config(hf)


@pytest.mark.parametrize("over,message", [
    (["model.rope_scaling=0.5"], "model.rope_scaling: expected a factor > 1"),
    (["model.rope_scaling=0"], "model.rope_scaling: expected a factor > 1"),
    (["model.rope_scaling_type=yarn"], "model.rope_scaling: rope_scaling_type=yarn needs a factor > 1"),
    (["model.rope_scaling=2", "model.rope_scaling_type=ntk"], "model.rope_scaling_type: "),
])
def test_bad_scaling_is_a_one_line_error(over, message):
    with pytest.raises(ConfigError, match="^" + message) as e:
        load_config("examples/configs/tiny.yaml", over)
    assert "\n" not in str(e.value)


def test_extension_overlay_loads():
    """The README's recipe: the overlay takes a 256-token model to 1,024 tokens with PI, factor 4."""
    cfg = load_config("examples/configs/tiny.yaml", ["train.seq_len=256", "model.max_seq_len=256"])
    ext = load_config("examples/configs/tiny.yaml", ["train.seq_len=256", "model.max_seq_len=256"]
                      + overlay_overrides("examples/configs/extend-context-4x.yaml"))
    assert (ext.model.max_seq_len, ext.train.seq_len, ext.model.rope_scaling) == (1024, 1024, 4.0)
    assert ext.model.rope_original_len == cfg.model.max_seq_len
