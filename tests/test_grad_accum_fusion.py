"""train.grad_accum_fusion: the linear layers add their weight gradients straight into the fp32 grad buffer.

Fused and unfused runs of the same model and microbatches must leave the same main_grad (1e-6 relative:
addmm's beta=1 accumulation rounds once where mm + add_ rounds twice), and the spy on the buffer's hook
checks the fused path really ran: every linear weight arrives flagged (its placeholder p.grad dropped
unread), nothing else does, and no p.grad survives backward. The tied embedding (also read by the
lookup) is never fused; bf16 weights against the fp32 buffer keep the hook's add. One process at
TP=1 (the plain `linear`), two at TP2 with and without SP (the async-grad column linear and the row
linear), and full recompute (the backward replays the forward)."""
import pytest
import torch

from dist import assert_close_rel, batch, gather_full, spawn, tiny_model_cfg
from megagpt.config import ParallelConfig, TrainConfig
from megagpt.model.gpt import build_model
from megagpt.optim.optimizer import build_optimizer
from megagpt.parallel.state import ParallelState
from megagpt.parallel.tp_overlap import ADDED, FUSE_WGRAD, fuses

LINEARS = ("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight", "lm_head.weight")
MICRO = 3


def run(ps, fusion: bool, tie: bool = False, sp: bool = False, recompute: str = "none", dtype="fp32",
        fuse_at=None):
    """MICRO microbatches of backward into a fresh grad buffer: (name -> whole main_grad, name -> the
    flags the hook saw on each microbatch, names whose p.grad is left, which params are marked, which
    buckets the hook launched during the last backward: their DP reduction overlaps it).
    fuse_at(i): whether the marked weights may fuse on microbatch i (what fuses() sees per forward)."""
    mcfg = tiny_model_cfg(tie_embeddings=tie, bias=True)
    tcfg = TrainConfig(seq_len=16, micro_batch_size=2, global_batch_size=2 * MICRO, dtype=dtype,
                       grad_accum_fusion=fusion, recompute=recompute)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = build_model(mcfg, ps, seed=tcfg.seed, sequence_parallel=sp, recompute=recompute, dtype=torch_dtype)
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(tp=ps.tp.size, sequence_parallel=sp), mcfg)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {n: [] for n in names.values()}
    real = opt.buffer._on_grad

    def spy(p):
        seen[names[id(p)]].append(bool(getattr(p, ADDED, False)))
        real(p)
    for h in opt.buffer._hooks:       # the buffer's hooks, replaced by the spy in front of them
        h.remove()
    opt.buffer._hooks = [p.register_post_accumulate_grad_hook(spy) for p in model.parameters()]
    opt.zero_grad()
    marked = [p for p in model.parameters() if getattr(p, FUSE_WGRAD, False)]
    for i in range(MICRO):
        for p in marked if fuse_at else ():
            setattr(p, FUSE_WGRAD, fuse_at(i))
        opt.set_sync(i == MICRO - 1)
        tokens, labels = batch(mcfg, 2, 16, seed=7 + i)
        model(tokens, labels).float().mean().backward()
    launched = [b.launched for b in opt.buffer.buckets]
    opt.buffer.finish_grad_sync()
    grads = {n: gather_full(p.main_grad, p.meta.spec, ps.tp) for n, p in model.named_parameters()}
    left = [n for n, p in model.named_parameters() if p.grad is not None]
    marked = sorted(n for n, p in model.named_parameters() if getattr(p, FUSE_WGRAD, False))
    return grads, seen, left, marked, launched


def check(fused, plain, tie=False, dtype="fp32"):
    (g1, seen1, left1, marked1, launched1), (g0, seen0, left0, marked0, launched0) = fused, plain
    assert left1 == [] and left0 == [] and marked0 == []
    assert launched1 == launched0 and any(launched0), "a fused arrival must count toward its bucket"
    for n, g in g1.items():
        assert_close_rel(g, g0[n], rtol=1e-6 if dtype == "fp32" else 1e-2, name=n)
        assert seen0[n] == [False] * MICRO, n
        expect = dtype == "fp32" and n.endswith(LINEARS)
        assert seen1[n] == [expect] * MICRO, f"{n}: hook saw fused flags {seen1[n]}"
        assert (n in marked1) == (dtype == "fp32"), n        # the buffer allows it; only linears use it
    if tie:
        assert seen1["embedding.weight"] == [False] * MICRO
    linears = 4 * 2 + (not tie)                   # 2 layers of qkv, proj, fc1, fc2, and the untied head
    assert sum(any(v) for v in seen1.values()) == (linears if dtype == "fp32" else 0)


@pytest.mark.parametrize("tie,recompute", [(False, "none"), (True, "none"), (False, "full"), (True, "selective")])
def test_fused_weight_grads_equal_the_hook_path_one_process(tie, recompute):
    ps = ParallelState.single()
    check(run(ps, True, tie, recompute=recompute), run(ps, False, tie, recompute=recompute), tie)


def test_bf16_weights_keep_the_hook_add():
    ps = ParallelState.single()
    check(run(ps, True, dtype="bf16"), run(ps, False, dtype="bf16"), dtype="bf16")


def _tp_worker(rank, world, tie, sp):
    ps = ParallelState.create(tp=2)
    fused, plain = run(ps, True, tie, sp), run(ps, False, tie, sp)
    check(fused, plain, tie)
    return True


@pytest.mark.parametrize("tie,sp", [(False, False), (True, True)])
def test_fused_weight_grads_equal_the_hook_path_tp2(tie, sp):
    assert spawn(2, _tp_worker, tie, sp) == [True, True]


def test_remove_hooks_unmarks_the_weights():
    ps = ParallelState.single()
    mcfg = tiny_model_cfg()
    model = build_model(mcfg, ps)
    opt = build_optimizer([model], ps, TrainConfig(seq_len=16, micro_batch_size=2, global_batch_size=2),
                          ParallelConfig(), mcfg)
    assert getattr(model.layers["0"].mlp.fc1.weight, FUSE_WGRAD)
    opt.buffer.remove_hooks()       # without the hook a fused gradient would be lost: plain autograd again
    tokens, labels = batch(mcfg, 2, 16)
    model(tokens, labels).mean().backward()
    assert all(not getattr(p, FUSE_WGRAD) and p.grad is not None for p in model.parameters())


def test_a_weight_fused_on_one_microbatch_and_plain_on_the_next():
    """fuses() is decided per forward (a compiled block keeps the plain path): after a fused arrival the hook
    must clear the flag, or the next microbatch's real gradient would be dropped as a placeholder."""
    ps = ParallelState.single()
    (mixed, seen, left, _, _), (plain, *_) = run(ps, True, fuse_at=lambda i: i % 2 == 0), run(ps, False)
    assert left == []
    for n, g in mixed.items():
        assert_close_rel(g, plain[n], rtol=1e-6, name=n)
    fc1 = next(n for n in seen if n.endswith("fc1.weight"))
    assert seen[fc1] == [True, False, True]


def test_fuses_needs_the_mark_grad_mode_and_requires_grad():
    """Generation, the alignment reference model and frozen weights never take the fused path."""
    w = torch.nn.Parameter(torch.randn(3, 4))
    assert not fuses(w)                         # no grad buffer marked it (no main_grad to add into)
    setattr(w, FUSE_WGRAD, True)
    assert fuses(w)
    with torch.no_grad():
        assert not fuses(w)
    with torch.inference_mode():
        assert not fuses(w)
    w.requires_grad_(False)
    assert not fuses(w)


def _trainer_worker(rank, world, fusion, parallel, recompute):
    """3 Trainer steps of 4 microbatches each: every step's loss and grad norm, step 1's owned reduced
    gradients (before the update), and how many weight gradients went the fused way."""
    import contextlib
    import io
    import os

    from megagpt.config import config_from_dict
    from megagpt.parallel import tp_overlap
    from megagpt.train import Trainer
    model = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96, vocab_size=256,
                 max_seq_len=16, tie_embeddings=False)
    train = dict(seq_len=16, micro_batch_size=2, global_batch_size=8 * world // parallel.get("tp", 1),
                 train_iters=3, eval_interval=0, warmup=0, lr=1e-2, grad_accum_fusion=fusion, recompute=recompute)
    cfg = config_from_dict({"model": model, "parallel": parallel, "train": train}, world)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, run_dir=os.devnull)
    fused, real = [0], tp_overlap.weight_grad

    def counted(param, g2, x2):
        fused[0] += param is not None
        return real(param, g2, x2)
    tp_overlap.weight_grad = counted
    update, grads = trainer.optimizer.update, {}
    adam = update.step

    def step(lr, n):
        if n == 1:
            grads.update({s.name: g.clone() for s, g in zip(update.segments, update.grads)})
        return adam(lr, n)
    update.step = step
    recs = [trainer.train_step() for _ in range(3)]
    return {"losses": torch.tensor([r["loss"] for r in recs]), "norms": torch.tensor([r["grad_norm"] for r in recs]),
            "grads": grads, "fused": fused[0]}


@pytest.mark.parametrize("world,parallel,recompute", [(1, {}, "none"), (2, {"tp": 2, "sequence_parallel": True}, "full"),
                                                      (2, {}, "selective")], ids=["one", "tp2-sp-full", "dp2-zero1-sel"])
def test_trainer_with_fusion_equals_trainer_without(world, parallel, recompute):
    """train.grad_accum_fusion true against false, same layout: 1e-5 relative (addmm may round once where
    mm + add_ rounds twice; on CPU at these shapes they came out bit for bit)."""
    on, off = (spawn(world, _trainer_worker, f, parallel, recompute) for f in (True, False))
    for a, b in zip(on, off):
        assert a["fused"] > 0 and b["fused"] == 0
        assert_close_rel(a["losses"], b["losses"], name="losses")
        assert_close_rel(a["norms"], b["norms"], name="grad norms")
        assert a["grads"].keys() == b["grads"].keys() and a["grads"]
        for n, g in a["grads"].items():
            assert_close_rel(g, b["grads"][n], name=n)
        assert not torch.equal(a["losses"][0], a["losses"][-1])        # it trained
