"""Generation through mixture-of-experts and mixture-of-depths layers: KV-cache decoding equals full
recompute (greedy tokens, fp32 logits to 1e-5). MoE runs dropless in eval mode even with a capacity
factor (a capacity over one decode step's tokens would drop otherwise than over the whole prefix).
A MoD layer routes each token by its causal predictor (model/mod.py `causal`): the processed tokens
attend among themselves, the others keep x bit for bit, and the predictor's decision is what routes."""
from __future__ import annotations

import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.generate import generate, generate_ids, generate_recompute
from megagpt.kv_cache import KVCache
from megagpt.model.block import Block
from megagpt.model.gpt import build_model
from megagpt.model.moe import MoEContext
from megagpt.model.rope import rope_tables
from megagpt.parallel.state import Group

MODEL = dict(vocab_size=211, max_seq_len=48, hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=4,
             ffn_hidden_size=96, make_vocab_divisible_by=1, init_std=0.08, use_flash_attn=False)
MOE = dict(moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=48, moe_layers=[0, 2])
PROMPTS = [[5, 17, 99, 3], [42, 7, 7, 8, 150, 61, 9, 12, 33], [1]]
ONE = Group("x", [0], 0)


def _model(**over):
    return build_model(ModelConfig(**{**MODEL, **over}), seed=1234).eval()


def _cached_equals_recompute(model, steps=12):
    prompt = torch.tensor([PROMPTS[1][:6], PROMPTS[1][3:]])                 # [2, 6]
    ref, ref_logits = generate_recompute(model, prompt, steps)
    cache = KVCache(model, 2, 6 + steps)
    with torch.no_grad():
        got = [model.gather_logits(model(prompt, cache=cache))[:, -1]]
        for t in range(steps - 1):
            got.append(model.gather_logits(model(ref[:, 6 + t:7 + t], cache=cache))[:, -1])
    for step, (a, e) in enumerate(zip(got, ref_logits)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), msg=lambda m: f"step {step}: {m}")
    assert torch.equal(generate(model, prompt, steps), ref)
    # left-padded prompts of different lengths: each row as if alone
    together = generate_ids(model, PROMPTS, 8)
    for p, row in zip(PROMPTS, together):
        assert row == generate_recompute(model, torch.tensor([p]), 8)[0][0, len(p):].tolist()
    # n samples of each prompt share its prefill, MoD routes included: row i*n+j continues prompt i
    assert generate_ids(model, PROMPTS, 8, num_samples=2) == [row for row in together for _ in range(2)]
    return cache


@pytest.mark.parametrize("over", [dict(MOE), dict(MOE, moe_capacity_factor=0.5),
                                  dict(MOE, moe_capacity_factor=1.0, moe_shared_expert_size=32)])
def test_moe_cached_generation_equals_recompute(over):
    _cached_equals_recompute(_model(**over))


def test_moe_capacity_drops_in_training_only():
    """The capacity factor acts on the training forward (drops change the output), not in eval."""
    model = _model(**MOE, moe_capacity_factor=0.5)
    tokens = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        evaluated = model(tokens)
        dropless = _model(**MOE)(tokens)
        trained = model.train()(tokens)
    torch.testing.assert_close(evaluated, dropless, rtol=0, atol=0)
    assert not torch.allclose(trained, evaluated, atol=1e-4)


def test_mod_cached_generation_equals_recompute():
    model = _model(mod_layers=[1, 2], mod_capacity=0.25)
    cache = _cached_equals_recompute(model)
    for layer in (1, 2):                                       # the predictor processed some tokens, not all
        route = cache.route[layer][:, :cache.length]
        assert route.any() and not route.all()
    assert not model.moe.causal_routing                          # generate_recompute restored the flag


def _block(seed=0):
    cfg = ModelConfig(**{**MODEL, "mod_layers": [0], "mod_capacity": 0.25})
    block = Block(cfg, ONE, False, None, dtype=torch.float64, layer_id=0, ep=ONE, moe_context=MoEContext())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    return block.eval(), cfg


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_predictor_decides_the_routing_at_generation(sign):
    """Eval with causal routing: token t is processed iff predictor . x_t > 0 (flipping the predictor
    processes the complement); a processed token's output is the training rule's on the subsequence
    of processed tokens (run_kept: the block on them alone, at their positions); the rest are x."""
    block, cfg = _block()
    with torch.no_grad():
        block.mod.predictor.mul_(sign)
    s = 16
    cos, sin = rope_tables(s, cfg.head_dim, cfg.rope_theta, 1.0, "cpu", torch.float64)
    x = torch.randn(s, 1, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = (x[:, 0] @ block.mod.predictor[0]) > 0                             # [s]
    assert 0 < int(keep.sum()) < s
    block.mod.context.causal_routing = True
    with torch.no_grad():
        out = block(x, cos, sin)
        ids = keep.nonzero()[:, 0]
        scores = (x @ block.mod.weight[0])                                   # [s, 1]
        ref = block.mod.run_kept(x, ids[:, None], scores, cos, sin, block._body)
    assert torch.equal(out[~keep], x[~keep])                                  # unprocessed: x bit for bit
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert (out[keep] != x[keep]).any(-1).all()


def _layout_worker(rank, world, tp, pp, over, steps):
    from megagpt.config import Config, ParallelConfig, TrainConfig
    from megagpt.parallel.state import ParallelState
    from megagpt.pipeline.split import build_stage
    ps = ParallelState.create(tp=tp, pp=pp)
    cfg = Config(model=ModelConfig(**{**MODEL, **over}), parallel=ParallelConfig(tp=tp, pp=pp, world_size=world),
                 train=TrainConfig(seq_len=32, micro_batch_size=1, global_batch_size=pp))
    return generate_ids(build_stage(cfg, ps, seed=1234), PROMPTS, steps, ps=ps)


def test_tp2_pp2_generates_the_one_process_tokens_through_moe_and_mod():
    """MoE (capacity factor, dropless at generation) and MoD (the predictor routes) under TP2 x PP2:
    every rank's greedy tokens are the one-process model's."""
    from dist import spawn
    over = dict(MOE, moe_capacity_factor=0.5, mod_layers=[1, 2], mod_capacity=0.25)
    want = generate_ids(_model(**over), PROMPTS, 8)
    for rank, got in enumerate(spawn(4, _layout_worker, 2, 2, over, 8, timeout=180)):
        assert got == want, f"rank {rank}"
