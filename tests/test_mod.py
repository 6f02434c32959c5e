"""Mixture of depths: a MoD block equals a naive per-sequence loop (forward and every gradient, fp64),
unselected tokens ride the residual bit for bit, the causal predictor is trained only by its own BCE,
and a model with MoD layers trains in one process and under TP2 (forked ranks, to 1e-5). Generation
with MoD (the predictor routes): tests/test_generate_moe.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist import assert_close_rel, batch, full_grads, spawn, tiny_model_cfg
from megagpt.config import ConfigError, load_config
from megagpt.model.block import Block
from megagpt.model.gpt import build_model
from megagpt.model.moe import MoEContext
from megagpt.model.rope import rope_tables
from megagpt.optim.finalize import finalize_grads
from megagpt.parallel.state import Group, ParallelState

ONE = Group("x", [0], 0)


def make_block(cfg, seed=0):
    block = Block(cfg, ONE, False, None, dtype=torch.float64, layer_id=0, ep=ONE, moe_context=MoEContext())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    return block


def naive(block, x, cos, sin, capacity):
    """Per sequence: route, run the block on the kept tokens as a sequence of their own (at their
    positions), add the gated update; the other tokens are copied."""
    s, b, h = x.shape
    k = math.ceil(capacity * s)
    out = []
    for j in range(b):
        col = x[:, j]                                                   # [s, h]
        scores = col @ block.mod.weight[0]
        ids = sorted(torch.topk(scores, k).indices.tolist())
        sub = col[ids].unsqueeze(1)                                     # [k, 1, h]
        y = block._body(sub, cos[ids], sin[ids])[:, 0]                  # [k, h]
        rows = list(col.unbind(0))
        for i, t in enumerate(ids):
            rows[t] = col[t] + torch.sigmoid(scores[t]) * (y[i] - col[t])
        out.append(torch.stack(rows))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("capacity", [0.125, 0.5, 1.0])
def test_mod_block_equals_naive_loop(capacity):
    cfg = tiny_model_cfg(num_heads=4, num_kv_heads=2, hidden_size=32, ffn_hidden_size=48, mod_layers=[0],
                         mod_capacity=capacity)
    block = make_block(cfg)
    s, b = 16, 3
    cos, sin = rope_tables(s, cfg.head_dim, cfg.rope_theta, 1.0, "cpu", torch.float64)
    x = torch.randn(s, b, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xa = x.clone().requires_grad_()
    y = block(xa, cos, sin)
    (y * r).sum().backward()
    ours = {n: p.grad.clone() for n, p in block.named_parameters()} | {"x": xa.grad}
    block.zero_grad()
    xb = x.clone().requires_grad_()
    y_ref = naive(block, xb, cos, sin, capacity)
    (y_ref * r).sum().backward()
    ref = {n: p.grad for n, p in block.named_parameters() if p.grad is not None} | {"x": xb.grad}
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    kept = math.ceil(capacity * s)
    assert int((y != x).any(-1).sum()) == kept * b                  # the rest are x itself, bit for bit
    assert ref.keys() == ours.keys() - {"mod.predictor"}            # the predictor is no part of the model
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")
    # the predictor: BCE of a linear probe on the detached input against the router's choice
    target = torch.zeros(s, b, dtype=torch.float64)
    target.scatter_(0, torch.topk(x @ block.mod.weight[0].detach(), kept, dim=0).indices, 1.0)
    probe = block.mod.predictor.detach().clone().requires_grad_()
    F.binary_cross_entropy_with_logits(x @ probe[0], target).backward()
    torch.testing.assert_close(ours["mod.predictor"], probe.grad, rtol=1e-10, atol=1e-12)


def _tp_worker(rank, world, cfg, tokens, labels):
    ps = ParallelState.create(tp=world)
    model = build_model(cfg, ps)
    loss = model(tokens, labels).mean()
    loss.backward()
    finalize_grads([model], ps, grad_of=lambda p: p.grad)
    return {"loss": loss.detach(), "grads": full_grads(model, ps.tp)}


def test_mod_model_under_tp2_equals_one_process():
    cfg = tiny_model_cfg(num_layers=3, mod_layers=[1, 2], mod_capacity=0.25, moe_num_experts=4, moe_layers=[2],
                         moe_aux_loss_coeff=0.01, vocab_size=1000)
    tokens, labels = batch(cfg, 2, 16)
    model = build_model(cfg)
    loss = model(tokens, labels).mean()
    loss.backward()
    assert [m[0] for m in model.moe.mod] == [1, 2]
    res = spawn(2, _tp_worker, cfg, tokens, labels)[0]
    assert_close_rel(res["loss"], loss.detach(), name="loss")
    for n, p in model.named_parameters():
        assert_close_rel(res["grads"][n], p.grad, name=n)


def test_mod_refuses_sequence_parallel():
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel: mixture of depths"):
        load_config(None, ["model.mod_layers=[0]", "parallel.tp=2", "parallel.sequence_parallel=true",
                           "model.num_layers=2", "train.seq_len=64", "model.max_seq_len=64"], world_size=2)
    with pytest.raises(ConfigError, match=r"^model.mod_capacity: expected 0 < fraction <= 1"):
        load_config(None, ["model.mod_layers=[0]", "model.mod_capacity=0", "model.num_layers=2",
                           "train.seq_len=64", "model.max_seq_len=64"])


@pytest.mark.parametrize("mod", [False, True])
def test_layer_flops_equal_the_counted_matmuls(mod):
    """model_size.layer_flops' matmul part (the one FLOP formula; flops_per_token sums it) against torch's FLOP
    counter on one block's training forward: a MoD layer at 12.5% runs its matmuls on ceil(c s) tokens
    of each sequence, plus its router and predictor on every token. (The counter does not count the CPU
    attention kernel, so the scores term is not checked here.)"""
    from torch.utils.flop_counter import FlopCounterMode
    from megagpt.model_size import layer_flops
    cfg = tiny_model_cfg(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                         **(dict(mod_layers=[0], mod_capacity=0.125) if mod else {}))
    block = make_block(cfg)
    s, b = 32, 2
    x = torch.randn(s, b, cfg.hidden_size, dtype=torch.float64)
    cos, sin = rope_tables(s, cfg.head_dim, cfg.rope_theta, 1.0, "cpu", torch.float64)
    with FlopCounterMode(display=False) as counter:
        block(x, cos, sin)
    assert counter.get_total_flops() == pytest.approx(layer_flops(cfg, s)[0] * s * b, rel=1e-12)


def test_mod_router_and_predictor_run_in_fp32_in_a_bf16_model(monkeypatch):
    """bf16 block: the router's scores (top-k) and the predictor's logits (generation's routing) are fp32
    ones of the upcast input, and the tokens kept are the fp32 top-k's."""
    import megagpt.model.mod as mod_module
    cfg = tiny_model_cfg(num_heads=4, num_kv_heads=2, hidden_size=32, ffn_hidden_size=48, mod_layers=[0],
                         mod_capacity=0.25)
    block = make_block(cfg).to(torch.bfloat16)
    seen = []

    def spy(scores, capacity):
        seen.append(scores)
        return keep_rule(scores, capacity)
    keep_rule = mod_module.mod_keep
    monkeypatch.setattr(mod_module, "mod_keep", spy)
    s, b = 32, 2
    cos, sin = rope_tables(s, cfg.head_dim, cfg.rope_theta, 1.0, "cpu", torch.float32)
    x = torch.randn(s, b, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    block(x, cos, sin)
    (scores,), ref = seen, x.float() @ block.mod.weight[0].float()                       # [s, b] fp32
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref, rtol=0, atol=0)
    assert torch.equal(keep_rule(scores, 0.25), torch.topk(ref, 8, dim=0).indices.sort(dim=0).values)
    guess = block.mod._scores(x, block.mod.predictor)
    assert guess.dtype == torch.float32
    torch.testing.assert_close(guess, x.float() @ block.mod.predictor[0].float(), rtol=0, atol=0)
    assert torch.equal(block.mod.predict(x), (x.float() @ block.mod.predictor[0].float()) > 0)
