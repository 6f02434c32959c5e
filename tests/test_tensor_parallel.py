"""TP and SP against the same model run in one process: loss and every gradient, fp32, 1e-5 relative."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dist import assert_close_rel, batch, gather_full, serial_loss_and_grads, spawn, tiny_model_cfg, tp_worker
from megagpt.parallel.cross_entropy import vocab_parallel_cross_entropy
from megagpt.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, split_spec
from megagpt.parallel.state import ParallelState

CASES = [(tp, sp, kv) for tp in (1, 2, 4) for sp in (False, True) for kv in (4, 1, 2) if not (tp == 1 and sp)]


@pytest.mark.parametrize("tp,sp,kv", CASES, ids=[f"tp{t}-{'sp' if s else 'nosp'}-kv{k}" for t, s, k in CASES])
def test_model_matches_serial(tp, sp, kv):
    # kv=4 of 8 heads: GQA split over TP; kv=2 with tp=4: GQA replicated; kv=1: MQA
    cfg = tiny_model_cfg(num_kv_heads=kv)
    tokens, labels = batch(cfg)
    ref_loss, ref_grads = serial_loss_and_grads(cfg, tokens, labels)
    out = spawn(tp, tp_worker, cfg, tp, sp, tokens, labels)[0]
    assert_close_rel(out["loss"], ref_loss, name="loss")
    assert set(out["grads"]) == set(ref_grads)
    for name, g in out["grads"].items():
        ref = ref_grads[name]
        if g.shape != ref.shape:  # padded vocab rows: compare the real vocab, padding must get no gradient
            assert name.endswith(("embedding.weight", "lm_head.weight"))
            assert torch.all(g[cfg.vocab_size:] == 0)
            g, ref = g[: cfg.vocab_size], ref[: cfg.vocab_size]
        assert_close_rel(g, ref, name=name)


def test_tied_embeddings_match_serial():
    cfg = tiny_model_cfg(tie_embeddings=True)
    tokens, labels = batch(cfg)
    ref_loss, ref_grads = serial_loss_and_grads(cfg, tokens, labels)
    out = spawn(2, tp_worker, cfg, 2, True, tokens, labels)[0]
    assert_close_rel(out["loss"], ref_loss, name="loss")
    assert "lm_head.weight" not in out["grads"]
    for name, g in out["grads"].items():
        assert_close_rel(g[: ref_grads[name].shape[0]], ref_grads[name], name=name)


# ------------------------------------------------------------------ each layer alone

def _layers_worker(rank, world, sp):
    torch.manual_seed(0)
    ps = ParallelState.create(tp=world)
    tp = ps.tp
    s, b, h, out_f, vocab = 8, 2, 16, 24, 40
    x = torch.randn(s, b, h)
    ref_col, ref_row = nn.Linear(h, out_f, bias=True), nn.Linear(out_f, h, bias=True)
    ref_emb = nn.Embedding(vocab, h)
    tokens = torch.randint(0, vocab, (b, s))
    col = ColumnParallelLinear(h, out_f, tp, sp, bias=True)
    row = RowParallelLinear(out_f, h, tp, sp, bias=True)
    emb = VocabParallelEmbedding(vocab, h, tp, sp)
    with torch.no_grad():
        col.weight.copy_(col.weight.meta.spec.shard(ref_col.weight, tp.rank, tp.size))
        col.bias.copy_(col.bias.meta.spec.shard(ref_col.bias, tp.rank, tp.size))
        row.weight.copy_(row.weight.meta.spec.shard(ref_row.weight, tp.rank, tp.size))
        row.bias.copy_(ref_row.bias)
        emb.weight.copy_(emb.weight.meta.spec.shard(ref_emb.weight, tp.rank, tp.size))
    # reference: embedding -> linear -> linear, summed
    ref_out = ref_row(ref_col(ref_emb(tokens.t()) + x))
    ref_out.square().sum().backward()
    x_local = x.chunk(tp.size)[tp.rank] if sp else x
    y = row(col(emb(tokens) + x_local))                      # [s/tp or s, b, h]
    full_y = gather_full(y, split_spec(0, s), tp) if sp else y
    loss = y.square().sum()
    loss.backward()
    if sp:  # the replicated row bias saw only this rank's sequence shard
        dist.all_reduce(row.bias.grad, group=tp.pg)
    res = {"y": full_y.detach(), "ref_y": ref_out.detach()}
    for name, mod, ref in (("col", col, ref_col), ("row", row, ref_row), ("emb", emb, ref_emb)):
        res[name + ".weight"] = (gather_full(mod.weight.grad, mod.weight.meta.spec, tp), ref.weight.grad)
    res["col.bias"] = (gather_full(col.bias.grad, col.bias.meta.spec, tp), ref_col.bias.grad)
    res["row.bias"] = (row.bias.grad.clone(), ref_row.bias.grad)
    return res


@pytest.mark.parametrize("sp", [False, True])
def test_parallel_layers_alone(sp):
    res = spawn(2, _layers_worker, sp)
    for r in res:
        assert_close_rel(r["y"], r["ref_y"], name="output")
        for k, (g, ref) in ((k, v) for k, v in r.items() if k not in ("y", "ref_y")):
            assert_close_rel(g, ref, name=k)


def _ce_worker(rank, world, logits, labels, vocab):
    ps = ParallelState.create(tp=world)
    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, labels, ps.tp, vocab)
    loss.sum().backward()
    return {"loss": loss.detach(), "grad": gather_full(local.grad, split_spec(2, logits.shape[-1]), ps.tp)}


@pytest.mark.parametrize("tp,vocab,padded", [(1, 40, 40), (1, 37, 40), (2, 40, 40), (4, 37, 40), (2, 39, 40)])
def test_vocab_parallel_cross_entropy(tp, vocab, padded):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 2, padded, generator=g) * 3
    labels = torch.randint(0, vocab, (6, 2), generator=g)
    ref_logits = logits[..., :vocab].clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(6, 2)
    ref.sum().backward()
    for r in spawn(tp, _ce_worker, logits, labels, vocab):
        assert_close_rel(r["loss"], ref.detach(), name="ce loss")
        assert_close_rel(r["grad"][..., :vocab], ref_logits.grad, name="ce grad")
        assert torch.all(r["grad"][..., vocab:] == 0)
