"""Dropout 0.1 under TP=2: reproducible for a seed; masks agree across TP ranks in replicated regions
and differ in sharded ones (attention heads, SP sequence shards)."""
import torch

from dist import batch, full_grads, spawn, tiny_model_cfg
from megagpt.model.gpt import build_model
from megagpt.optim.finalize import finalize_grads
from megagpt.parallel.random import dropout, seed_everything
from megagpt.parallel.state import ParallelState


def _worker(rank, world, cfg, sp, seed, tokens, labels):
    ps = ParallelState.create(tp=world)
    tracker = seed_everything(seed, tp_rank=ps.tp.rank)
    model = build_model(cfg, ps, sequence_parallel=sp, tracker=tracker)
    model.train()
    hidden = {}
    model.final_norm.register_forward_pre_hook(lambda m, i: hidden.update(h=i[0].detach().clone()))
    loss = model(tokens, labels).mean()
    loss.backward()
    finalize_grads([model], ps, grad_of=lambda p: p.grad)
    # the rule, drawn directly: replicated regions share masks, sharded regions do not
    x = torch.ones(64, 4)
    replicated_mask = dropout(x, 0.5, True, tracker, sharded=False) == 0
    sharded_mask = dropout(x, 0.5, True, tracker, sharded=True) == 0
    return {"loss": loss.detach(), "grads": full_grads(model, ps.tp), "hidden": hidden["h"],
            "replicated": replicated_mask, "sharded": sharded_mask}


def test_dropout_rule_and_reproducibility():
    cfg = tiny_model_cfg(hidden_dropout=0.1, attention_dropout=0.1)
    tokens, labels = batch(cfg)
    a = spawn(2, _worker, cfg, False, 7, tokens, labels)
    b = spawn(2, _worker, cfg, False, 7, tokens, labels)
    c = spawn(2, _worker, cfg, False, 8, tokens, labels)
    # reproducible for a seed, bit for bit
    assert torch.equal(a[0]["loss"], b[0]["loss"])
    for name in a[0]["grads"]:
        assert torch.equal(a[0]["grads"][name], b[0]["grads"][name]), name
    # another seed draws other masks
    assert not torch.equal(a[0]["loss"], c[0]["loss"])
    # without SP the hidden states are replicated over TP: identical masks keep them identical
    assert torch.equal(a[0]["hidden"], a[1]["hidden"])
    assert torch.equal(a[0]["replicated"], a[1]["replicated"])
    assert not torch.equal(a[0]["sharded"], a[1]["sharded"])
    # dropout is really on: the loss differs from the dropout-free model's
    d = spawn(2, _worker, tiny_model_cfg(), False, 7, tokens, labels)
    assert not torch.equal(a[0]["loss"], d[0]["loss"])


def _sp_mask_worker(rank, world, cfg, tokens):
    """The hidden-dropout mask the first block really applied to this rank's [s/tp, b, h] shard."""
    ps = ParallelState.create(tp=world)
    model = build_model(cfg, ps, sequence_parallel=True, tracker=seed_everything(7, tp_rank=ps.tp.rank))
    seen = {}
    block = model.layers["0"]
    block.norm1.register_forward_pre_hook(lambda m, i: seen.update(x_in=i[0].detach().clone()))
    block.attention.register_forward_hook(lambda m, i, o: seen.update(y=o.detach().clone()))
    block.norm2.register_forward_pre_hook(lambda m, i: seen.update(x_mid=i[0].detach().clone()))
    model(tokens)
    kept = (seen["x_mid"] - seen["x_in"]) != 0          # x_mid = x_in + dropout(y): zero where dropped
    return {"dropped": ~kept & (seen["y"] != 0), "live": seen["y"] != 0}


def test_sequence_parallel_shards_draw_different_masks():
    """Under SP each rank drops elements of its own sequence shard: the masks the model applies
    must be independent draws, not the same pattern repeated on every shard."""
    cfg = tiny_model_cfg(hidden_dropout=0.5, attention_dropout=0.0)
    tokens, _ = batch(cfg)
    a, b = spawn(2, _sp_mask_worker, cfg, tokens)
    for r in (a, b):  # dropout is really on, at about p = 0.5
        frac = r["dropped"].sum().item() / r["live"].sum().item()
        assert 0.4 < frac < 0.6, frac
    assert not torch.equal(a["dropped"], b["dropped"])
    again = spawn(2, _sp_mask_worker, cfg, tokens)  # and reproducible for the seed
    assert torch.equal(again[0]["dropped"], a["dropped"])
