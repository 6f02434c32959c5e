"""The analytic memory model against hand computations (Korthikanti et al. 2022, 6 + 12/d, ...)."""
import dataclasses

import pytest

from megagpt.config import ConfigError, ModelConfig
from megagpt.model_size import count_params, layer_params
from megagpt.layout import Layout
from megagpt.memory import (bytes_per_param, in_flight, layer_activation_bytes, layer_activation_terms,
                            memory_per_rank, params_per_rank)


def gpt(**kw):
    """MHA, 4h GELU, LayerNorm, dropout on: the case Korthikanti's formula is written for."""
    base = dict(vocab_size=1024 * 50, max_seq_len=4096, hidden_size=1024, num_layers=8, num_heads=16,
                ffn_hidden_size=4096, mlp="gelu", norm="layernorm", hidden_dropout=0.1, attention_dropout=0.1)
    return ModelConfig(**(base | kw))


def llama(**kw):
    base = dict(vocab_size=32000, max_seq_len=8192, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                ffn_hidden_size=11008, mlp="swiglu", norm="rmsnorm")
    return ModelConfig(**(base | kw))


S, B = 2048, 2


def memory(m, tp, pp, vp, dp, seq_len, micro_batch, num_microbatches, sequence_parallel=True, **kw):
    layout = Layout(tp=tp, pp=pp, vp=vp, world_size=tp * pp * dp, sp=sequence_parallel, seq_len=seq_len,
                    micro_batch=micro_batch, global_batch=micro_batch * num_microbatches * dp)
    return memory_per_rank(m, layout, **kw)


def per_rank(m, tp, pp, vp=1):
    return params_per_rank(m, Layout(tp=tp, pp=pp, vp=vp, world_size=tp * pp, seq_len=S, global_batch=pp))


def stage_layers(m, pp, vp):
    return Layout(pp=pp, vp=vp, world_size=pp, seq_len=S, global_batch=pp).stage_layers(m)


def test_bytes_per_param_mixed_precision_is_6_plus_12_over_d():
    for d in (1, 2, 8, 64):
        bp = bytes_per_param("bf16", d, True)
        assert bp["weights"] + bp["grads"] + bp["optimizer"] == pytest.approx(6 + 12 / d)
        assert sum(bytes_per_param("fp16", d, False).values()) == 18
    assert sum(bytes_per_param("fp32", 4, True).values()) == pytest.approx(8 + 8 / 4)
    assert sum(bytes_per_param("fp32", 4, False).values()) == 16


def test_korthikanti_no_parallelism():
    m = gpt()
    s, b, h, a = S, B, m.hidden_size, m.num_heads
    got = layer_activation_bytes(m, 1, s, b, sequence_parallel=False, flash=False)
    assert got == s * b * h * 34 + 5 * a * s * s * b


@pytest.mark.parametrize("t", [2, 4, 8])
def test_korthikanti_tensor_and_sequence_parallel(t):
    m = gpt()
    s, b, h, a = S, B, m.hidden_size, m.num_heads
    sbh = s * b * h
    no_sp = sbh * (10 + 24 / t) + 5 * a * s * s * b / t
    assert layer_activation_bytes(m, t, s, b, False, flash=False) == pytest.approx(no_sp)
    assert layer_activation_bytes(m, t, s, b, True, flash=False) == pytest.approx(sbh * 34 / t + 5 * a * s * s * b / t)
    assert layer_activation_bytes(m, t, s, b, True, flash=False, recompute="selective") == pytest.approx(34 * sbh / t)
    assert layer_activation_bytes(m, t, s, b, True, flash=False, recompute="full") == pytest.approx(2 * sbh / t)
    assert layer_activation_bytes(m, t, s, b, False, flash=False, recompute="full") == pytest.approx(2 * sbh)


def test_gqa_swiglu_flash_by_hand():
    m = llama()          # no dropout, so no masks
    s, b, h, d, f = S, B, m.hidden_size, m.head_dim, m.ffn_hidden_size
    sb = s * b
    # norm1 in, qkv in, Q, K+V (8 heads), proj in, norm2 in, mlp in, gate+up, act out, fp32 logsumexp
    hand = 2 * sb * h * 2 + 2 * sb * h + 4 * sb * 8 * d + 2 * sb * h + 2 * sb * h * 2 + 4 * sb * f + 2 * sb * f \
        + 4 * 32 * s * b
    assert layer_activation_bytes(m, 1, s, b, False, flash=True) == hand
    # tp=4 with SP: everything / 4 (8 KV heads split as 2 per rank)
    assert layer_activation_bytes(m, 4, s, b, True, flash=True) == pytest.approx(hand / 4)
    # selective recompute only drops the attention core (here the logsumexp)
    assert layer_activation_bytes(m, 1, s, b, False, True, recompute="selective") == hand - 4 * 32 * s * b


def test_kv_heads_replicated_when_fewer_than_tp():
    m = llama(num_heads=32, num_kv_heads=4)
    t = layer_activation_terms(m, 8, S, B, True, True)
    assert t["kv"] == 2 * 2 * S * B * 1 * m.head_dim        # one KV head per rank
    h, d = m.hidden_size, m.head_dim
    per_rank = h * (4 + 2) * d + 4 * d * h + 3 * h * m.ffn_hidden_size // 8 + h * 2
    assert layer_params(m, 8) == per_rank


def test_fp32_activations_double():
    m = llama()     # no dropout masks (bool) and no flash logsumexp (always fp32): every term doubles
    assert layer_activation_bytes(m, 2, S, B, True, flash=False, dtype="fp32") == \
        2 * layer_activation_bytes(m, 2, S, B, True, flash=False)
    lse = 4 * (32 // 2) * S * B
    assert layer_activation_bytes(m, 2, S, B, True, dtype="fp32") - lse == \
        2 * (layer_activation_bytes(m, 2, S, B, True) - lse)


def test_params_per_rank_sum_to_the_model():
    m = llama()                                            # 32000 is a multiple of 128: no padding at tp=1
    assert per_rank(m, 1, 1) == [count_params(m)]
    norms = 2 * m.hidden_size
    for tp in (2, 4, 8):
        assert layer_params(m, tp) == (layer_params(m) - norms) // tp + norms
    parts = per_rank(m, 1, 4)
    assert sum(parts) == count_params(m)
    assert parts[0] - parts[1] == m.vocab_size * m.hidden_size              # embedding on the first stage
    assert parts[3] - parts[1] == m.vocab_size * m.hidden_size + norms // 2  # head + final norm on the last
    tied = dataclasses.replace(m, tie_embeddings=True)
    assert per_rank(tied, 1, 1) == [count_params(tied)]
    assert sum(per_rank(tied, 1, 2)) == count_params(tied) + m.vocab_size * m.hidden_size  # last stage's copy


def test_uneven_split_and_interleaving():
    m = llama(num_layers=30)
    assert stage_layers(m, 4, 1) == [7, 8, 8, 7]
    assert stage_layers(llama(), 4, 2) == [8, 8, 8, 8]


def test_in_flight():
    assert [in_flight(4, 1, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight(4, 1, 2, 0) == 2
    assert in_flight(1, 1, 16, 0) == 1
    pp, vp = 4, 2
    assert in_flight(pp, vp, 8, 0) == pytest.approx(pp * (1 + (pp - 1) / (pp * vp)))
    assert in_flight(pp, vp, 4, 0) == 4          # m == pp: every forward runs before any backward, capped at m
    assert in_flight(8, 4, 8, 7) == pytest.approx((3 * 8 + 1) / 4)


def test_memory_per_rank_totals_and_stages():
    m = llama()
    tp, pp, dp = 2, 4, 8
    r = memory(m, tp, pp, 1, dp, S, 1, 16)
    p = r["params_on_rank"]
    assert r["weights"] == 2 * p and r["grads"] == 4 * p and r["optimizer"] == pytest.approx(12 * p / dp)
    assert r["total"] == pytest.approx(r["weights"] + r["grads"] + r["optimizer"] + r["activations"])
    # the first stage keeps pp microbatches of its 8 layers; it is the most loaded here
    per_layer = layer_activation_bytes(m, tp, S, 1, True)
    assert r["pp_rank"] == 0 and r["activations"] == pytest.approx(4 * 8 * per_layer)
    # one stage: the head's fp32 logits and its inputs are added
    one = memory(m, tp, 1, 1, dp, S, 1, 16)
    logits = 4 * S * m.padded_vocab(tp) / tp
    assert one["activation_detail"]["head"] == pytest.approx(2 * 2 * S * m.hidden_size / tp + logits)
    assert one["activations"] == pytest.approx(32 * per_layer + one["activation_detail"]["head"])
    no_dist = memory(m, tp, pp, 1, dp, S, 1, 16, distributed_optimizer=False)
    assert no_dist["optimizer"] == 12 * no_dist["params_on_rank"]


def test_full_recompute_keeps_inputs_plus_one_working_layer():
    m = llama()
    r = memory(m, 8, 1, 1, 1, S, 1, 4, recompute="full")
    inp, full = 2 * S * m.hidden_size / 8, layer_activation_bytes(m, 8, S, 1, True)
    assert r["activation_detail"]["layers"] == pytest.approx(32 * inp)
    assert r["activation_detail"]["recompute_working"] == pytest.approx(full)
    part = memory(m, 8, 1, 1, 1, S, 1, 4, recompute="full", recompute_num_layers=10)
    assert part["activation_detail"]["layers"] == pytest.approx(10 * inp + 22 * full)


def test_sequence_parallel_saves_memory():
    m = llama()
    on = memory(m, 8, 1, 1, 1, S, 1, 4, sequence_parallel=True)
    off = memory(m, 8, 1, 1, 1, S, 1, 4, sequence_parallel=False)
    assert on["activations"] < off["activations"] and on["weights"] == off["weights"]


@pytest.mark.parametrize("kw,field", [(dict(tp=3), "model.num_heads:"), (dict(pp=64), "parallel.pp:"),
                                      (dict(vp=2), "parallel.vp:"), (dict(dtype="int8"), "train.dtype:"),
                                      (dict(recompute="some"), "train.recompute:"),
                                      (dict(micro_batch=0), "train.micro_batch_size:")])
def test_one_line_errors_name_the_field(kw, field):
    args = dict(tp=1, pp=1, vp=1, dp=1, seq_len=S, micro_batch=1, num_microbatches=4) | kw
    with pytest.raises(ConfigError) as e:
        memory(llama(), **args)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)
