"""An independent reference: megagpt's weights copied into transformers' LlamaForCausalLM, built
offline from the LlamaConfig that to_hf_config gives, produce the same logits (fp32, 1e-4 absolute).
Also megagpt -> HF -> megagpt is bit-exact per tensor."""
import pytest
import torch

from megagpt.checkpoint.hf import iter_hf_to_megagpt, iter_megagpt_to_hf, megagpt_names, to_hf_config
from megagpt.config import ModelConfig
from megagpt.model.gpt import build_model

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=512, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
            ffn_hidden_size=96, mlp="swiglu", norm="rmsnorm", make_vocab_divisible_by=1, init_std=0.05,
            use_flash_attn=False)
CASES = {
    "gqa-untied": {},
    "tied": dict(tie_embeddings=True),
    "mqa": dict(num_kv_heads=1),
    "mha": dict(num_kv_heads=None),
    "position-interpolation": dict(rope_scaling=2.0, rope_theta=500.0),
    # head_dim 16, L = 1024: YaRN's ramp runs over dims 1..5 of 8, so all three regimes show
    "yarn": dict(rope_scaling=4.0, rope_scaling_type="yarn", max_seq_len=4096, num_heads=4),
    "rope-interleaved": dict(rope_interleaved=True),
    "vocab-padded": dict(vocab_size=1000, make_vocab_divisible_by=64),
    "bias": dict(bias=True),
    "geglu": dict(mlp="geglu"),
}


def _model(cfg: ModelConfig):
    """A megagpt model whose every tensor is distinct: norms and biases get noise too, so a swapped
    norm or a dropped bias shows in the logits."""
    model = build_model(cfg, seed=7).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_llama(case):
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    model = _model(cfg)
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = dict(iter_megagpt_to_hf(model.state_dict().items(), cfg))
    result = hf.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    # a tied HF model lists lm_head.weight in its state dict: it is the embedding, so it is not written
    assert result.missing_keys == (["lm_head.weight"] if cfg.tie_embeddings else [])
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.gather_logits(model(tokens))
        theirs = hf(input_ids=tokens).logits
    assert ours.shape == theirs.shape == (2, 24, cfg.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["gqa-untied", "tied", "rope-interleaved", "vocab-padded", "bias"])
def test_round_trip_is_bit_exact(case):
    cfg = ModelConfig(**{**BASE, **CASES[case]})
    original = _model(cfg).state_dict()
    hf = dict(iter_megagpt_to_hf(original.items(), cfg))
    back = dict(iter_hf_to_megagpt(hf.__getitem__, cfg))
    assert list(back) == megagpt_names(cfg) == list(original)
    for name, t in back.items():
        ref = original[name]
        assert t.shape == ref.shape, name
        if name in ("embedding.weight", "lm_head.weight"):   # padding rows come back as zeros
            assert torch.equal(t[cfg.vocab_size:], torch.zeros_like(t[cfg.vocab_size:])), name
            t, ref = t[: cfg.vocab_size], ref[: cfg.vocab_size]
        assert torch.equal(t, ref), name


HF_ARCHS = {
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=False)),
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("arch", list(HF_ARCHS))
def test_import_matches_transformers(arch):
    """The other direction: a random HF model (Llama with attention-only biases, Mistral without a
    window in effect, tied Qwen2 with q/k/v biases) imported into megagpt gives the same logits."""
    from megagpt.checkpoint.hf import from_hf_config, load_hf_into_model
    cfg_cls, model_cls, extra = HF_ARCHS[arch]
    hf_cfg = getattr(transformers, cfg_cls)(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, architectures=[arch],
        attn_implementation="eager", **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn(p.shape))          # biases and norms start at 0 and 1: make them count
    cfg = from_hf_config(hf_cfg.to_dict(), make_vocab_divisible_by=128, use_flash_attn=False)
    model = build_model(cfg, seed=0).eval()
    sd = hf.state_dict()
    load_hf_into_model(model, sd.__getitem__, hf_cfg.to_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.gather_logits(model(tokens)), hf(input_ids=tokens).logits,
                                   atol=1e-4, rtol=0)
