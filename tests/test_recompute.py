"""Activation recompute: the same gradients with none / selective / full, dropout on (the recomputed
masks must be the ones of the first forward), in one process and under TP2+SP; and the bytes saved
for backward, measured with SavedTensorMeter, fall from none to selective to full."""
import pytest
import torch

from dist import batch, spawn, tiny_model_cfg
from megagpt.activation_meter import SavedTensorMeter
from megagpt.memory import layer_activation_terms
from megagpt.model.gpt import build_model
from megagpt.optim.finalize import finalize_grads
from megagpt.parallel.random import checkpoint, seed_everything
from megagpt.parallel.state import ParallelState

MODES = ("none", "selective", "full")
SEQ, B = 32, 2


def cfg():
    return tiny_model_cfg(hidden_dropout=0.1, attention_dropout=0.1)


def run_modes(ps: ParallelState, sp: bool) -> dict:
    mcfg = cfg()
    tokens, labels = batch(mcfg, B, SEQ)
    out = {}
    for mode in MODES:
        tracker = seed_everything(7, ps.tp.rank)
        model = build_model(mcfg, ps, sequence_parallel=sp, recompute=mode, tracker=tracker)
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = model(tokens, labels).mean()
        loss.backward()
        finalize_grads([model], ps, grad_of=lambda p: p.grad)
        out[mode] = {"loss": loss.detach(), "bytes": meter.bytes,
                     "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
        if mode == "none":
            model.eval()
            out["eval_loss"] = model(tokens, labels).mean().detach()
    return out


def block_full_bytes(ps: ParallelState, sp: bool) -> dict:
    """One block under full recompute keeps its input, plus the RoPE tables it was called with."""
    mcfg = cfg()
    tracker = seed_everything(7, ps.tp.rank)
    model = build_model(mcfg, ps, sequence_parallel=sp, tracker=tracker)
    x = torch.randn(SEQ // (ps.tp.size if sp else 1), B, mcfg.hidden_size, requires_grad=True)
    cos, sin = model._rope(SEQ, x.device, torch.float32)
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        checkpoint(model.layers["0"], tracker, x, cos, sin)
    analytic = layer_activation_terms(mcfg, ps.tp.size, SEQ, B, sp, dtype="fp32")["norm1_input"]
    return {"measured": meter.bytes, "rope": (cos.numel() + sin.numel()) * 4, "analytic": analytic,
            "input": x.numel() * 4}


def tp_worker(rank, world):
    ps = ParallelState.create(tp=world)
    return {"modes": run_modes(ps, True), "block": block_full_bytes(ps, True)}


def check(res: dict, label: str):
    ref = res["none"]
    assert not torch.equal(res["eval_loss"], ref["loss"]), "dropout must be active for the test to mean anything"
    for mode in ("selective", "full"):
        assert torch.equal(res[mode]["loss"], ref["loss"]), f"{label} {mode}: loss differs"
        for name, g in res[mode]["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-6, atol=1e-9,
                                       msg=lambda m: f"{label} {mode} {name}: {m}")
    b = {m: res[m]["bytes"] for m in MODES}
    assert b["full"] < b["selective"] < b["none"], f"{label}: saved bytes {b}"


def test_recompute_same_grads_and_fewer_bytes_serial():
    check(run_modes(ParallelState.single(), False), "tp1")


@pytest.fixture(scope="module")
def tp2():
    return spawn(2, tp_worker)


def test_recompute_same_grads_and_fewer_bytes_tp2_sp(tp2):
    for r in tp2:
        check(r["modes"], "tp2+sp")


def test_full_recompute_keeps_only_the_layer_input(tp2):
    """Measured: the block's input and the RoPE tables, nothing else; and memory.py's term agrees."""
    for label, r in (("tp1", block_full_bytes(ParallelState.single(), False)), ("tp2+sp", tp2[0]["block"])):
        assert r["measured"] == r["input"] + r["rope"], f"{label}: {r}"
        assert r["input"] == r["analytic"], f"{label}: memory.py's full-recompute term: {r}"
