"""DP with the distributed (ZeRO-1) and the plain optimizer against torch.optim.AdamW in one process.

Every layout runs 5 optimizer steps on the same global batch of 8 sequences (2 microbatches per DP
rank, so gradient accumulation and the no-sync path run) with warm-up + cosine LR, weight decay and
clipping active (the norms are ~2, the clip 1.0); then every parameter, and every step's global grad
norm, must equal the one-process run's to 1e-5 relative. Layouts: DP 1/2/4 with ZeRO-1, DP2 plain,
DP2xTP2+SP (MQA: replicated K/V rows), DP4 with padded buckets, and through the pipeline engine
DP2xTP2xPP2 and DP2xPP2 interleaved (vp=2), both with tied embeddings.

Why adam_eps=1e-4 and no biases: on its first step Adam's update is lr * g / (|g| + eps), whose
slope in g is up to lr / eps. Any reordering of the sums (microbatches, DP, TP) moves a gradient by
~1e-7 of the largest one, so with eps=1e-8 one element in ~1e4 whose gradient happens to be near
zero moves by ~lr * 1e-2 (measured: 3x over the tolerance under DP2xTP2). eps=1e-4 bounds that
at lr * 1e-7 / 1e-4 and the layouts agree to ~2e-7 (2% of the tolerance). Biases start at zero, so
their scale after 5 steps is only ~lr * 5 and their sums of many signed terms are the noisiest
(0.6x the tolerance with biases on): left out here; the TP tests cover their gradients.
"""
import functools

import pytest
import torch
import torch.distributed as dist

from dist import assert_close_rel, batch, gather_full, spawn, tiny_model_cfg
from megagpt.config import ParallelConfig, TrainConfig
from megagpt.model.gpt import build_model
from megagpt.optim.lr import lr_at
from megagpt.optim.optimizer import DTYPES, build_optimizer
from megagpt.parallel.state import ParallelState

GLOBAL_BATCH, SEQ, STEPS, MICRO = 8, 16, 5, 2


def model_cfg(odd: bool = False, **over):
    """MQA: with tp=2 the K/V rows are replicated. odd: sizes that leave the buckets padded for dp=4."""
    if odd:
        over = dict(hidden_size=42, num_heads=3, ffn_hidden_size=90, **over)
    return tiny_model_cfg(num_kv_heads=1, **over)


def train_cfg(dp: int = 1, **over) -> TrainConfig:
    base = dict(seq_len=SEQ, micro_batch_size=GLOBAL_BATCH // (MICRO * dp), global_batch_size=GLOBAL_BATCH,
                train_iters=STEPS, lr=1e-3, min_lr=1e-4, warmup=2, decay_style="cosine", weight_decay=0.1,
                clip_grad=1.0, adam_eps=1e-4, dtype="fp32")
    base.update(over)
    return TrainConfig(**base)


def data(cfg, steps: int = STEPS):
    return [batch(cfg, GLOBAL_BATCH, SEQ, seed=100 + s) for s in range(steps)]


@functools.lru_cache(maxsize=4)
def serial_reference(tie_embeddings: bool = False, num_layers: int = 2, odd: bool = False, steps: int = STEPS):
    """One process, the whole global batch, torch.optim.AdamW with decay on matrices only. "grads": each
    step's gradients after clipping, as the update reads them."""
    mcfg, tcfg = model_cfg(odd, tie_embeddings=tie_embeddings, num_layers=num_layers), train_cfg(1)
    model = build_model(mcfg, seed=tcfg.seed)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": tcfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps)
    norms, losses, grads = [], [], []
    for step, (tokens, labels) in enumerate(data(mcfg, steps)):
        opt.zero_grad()
        loss = model(tokens, labels).sum() / tokens.numel()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(params, tcfg.clip_grad).item())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tcfg)
        opt.step()
        losses.append(loss.item())
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "norms": norms,
            "losses": losses, "grads": grads}


def run_steps(model, opt, ps, tcfg, steps, start=0, on_microbatch=None):
    """The training loop's inner part for one pipeline stage holding the whole model."""
    norms, losses, stats = [], [], []
    for step in range(start, start + steps):
        tokens, labels = data(model.cfg, start + steps)[step]
        rows = GLOBAL_BATCH // ps.dp.size
        mine = slice(ps.dp.rank * rows, (ps.dp.rank + 1) * rows)
        opt.zero_grad()
        total = torch.zeros(1)
        for i, (t, lab) in enumerate(zip(tokens[mine].chunk(MICRO), labels[mine].chunk(MICRO))):
            opt.set_sync(i == MICRO - 1)
            loss = model(t, lab).float().sum() / tokens.numel()
            opt.scale_loss(loss).backward()
            total += loss.detach()
            if on_microbatch is not None:
                on_microbatch(i)
        if ps.dp.size > 1:                           # the global loss, for the curves (not counted)
            dist.all_reduce(total, group=ps.dp.pg)
        s = opt.step(lr_at(step, tcfg))
        norms.append(s["grad_norm"])
        losses.append(total.item())
        stats.append(s)
    return norms, losses, stats


def full_params(model, ps) -> dict:
    return {n: gather_full(p.detach().float(), p.meta.spec, ps.tp) for n, p in model.named_parameters()}


def dp_worker(rank, world, mcfg, tcfg, pcfg):
    ps = ParallelState.create(tp=pcfg.tp)
    model = build_model(mcfg, ps, seed=tcfg.seed, sequence_parallel=pcfg.sequence_parallel,
                        dtype=DTYPES[tcfg.dtype])
    opt = build_optimizer([model], ps, tcfg, pcfg, mcfg)
    norms, losses, _ = run_steps(model, opt, ps, tcfg, STEPS)
    opt.finish_param_sync()
    out = {"params": full_params(model, ps), "norms": norms, "losses": losses,
           "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
           "main_dtypes": sorted({str(s.main.dtype) for s in getattr(opt.update, "segments", [])}),
           "padding": opt.buffer.padding()}
    return out if rank == 0 else None


def compare_params(got: dict, ref: dict, vocab: int, rtol: float = 1e-5):
    assert set(got) == set(ref)
    for name, p in got.items():
        r = ref[name]
        if p.shape != r.shape:                        # the padded vocab rows of a TP layout
            p = p[:vocab]
        assert_close_rel(p, r, rtol=rtol, name=name)


# (dp, tp, sp, distributed, odd)
GRID = [(1, 1, False, True, False), (2, 1, False, True, False), (4, 1, False, True, False),
        (2, 1, False, False, False), (2, 2, True, True, False), (4, 1, False, True, True)]


@pytest.mark.parametrize("dp,tp,sp,distributed,odd", GRID,
                         ids=[f"dp{d}-tp{t}{'-sp' if s else ''}-{'zero1' if z else 'plain'}{'-padded' if o else ''}"
                              for d, t, s, z, o in GRID])
def test_dp_matches_serial_adamw(dp, tp, sp, distributed, odd):
    mcfg, tcfg = model_cfg(odd), train_cfg(dp)
    ref = serial_reference(odd=odd)
    assert max(ref["norms"]) > tcfg.clip_grad, "clipping must be active for this test to mean anything"
    pcfg = ParallelConfig(tp=tp, sequence_parallel=sp, distributed_optimizer=distributed, bucket_size_mb=0.05)
    out = spawn(dp * tp, dp_worker, mcfg, tcfg, pcfg)[0]
    assert (out["padding"] > 0) == odd, f"bucket padding {out['padding']}"
    for step, (n, r) in enumerate(zip(out["norms"], ref["norms"])):
        assert abs(n - r) <= 1e-5 * r, f"step {step}: grad norm {n} != serial {r}"
    compare_params(out["params"], ref["params"], mcfg.vocab_size)


def test_bf16_tracks_fp32():
    """bf16 weights and compute, fp32 main params and grad accumulation, against the fp32 run.

    Judged on what training changed: each matrix's update (final - initial) must match the fp32
    update to within 25% in norm (an untrained model is 100% off), and the losses to 5e-3 nats.
    Norm weights sit near 1.0, where bf16's spacing (2^-7) exceeds five steps of updates: the fp32
    main copy holds their progress, the bf16 copy cannot, so they are checked to bf16 rounding only."""
    mcfg = model_cfg()
    pcfg = ParallelConfig(distributed_optimizer=True, bucket_size_mb=0.05)
    ref = serial_reference()
    init = {n: p.detach().clone() for n, p in build_model(mcfg, seed=train_cfg(1).seed).named_parameters()}
    out = spawn(2, dp_worker, mcfg, train_cfg(2, dtype="bf16"), pcfg)[0]
    assert out["dtypes"] == ["torch.bfloat16"] and out["main_dtypes"] == ["torch.float32"]
    for step, (a, b) in enumerate(zip(out["losses"], ref["losses"])):
        assert abs(a - b) <= 5e-3, f"step {step}: bf16 loss {a} vs fp32 {b}"
    for name, p in out["params"].items():
        if p.ndim < 2:
            torch.testing.assert_close(p.float(), ref["params"][name], rtol=2 ** -7, atol=0, msg=name)
            continue
        want = ref["params"][name] - init[name]
        got = p.float()[: want.shape[0]] - init[name]
        err = (got - want).norm() / want.norm()
        assert err <= 0.25, f"{name}: bf16 update is {err:.3f} of the fp32 update's norm away"


# ------------------------------------------------------------------ the hooks overlap backward

def overlap_worker(rank, world):
    mcfg, tcfg = model_cfg(), train_cfg(world)
    ps = ParallelState.create()
    model = build_model(mcfg, ps, seed=tcfg.seed)
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(bucket_size_mb=0.02), mcfg)
    launched_at_hook = []                            # reduce-scatters started when each hook fired
    key = ("reduce_scatter", "dp")
    for p in model.parameters():                     # registered after the buffer's, so they run after it
        p.register_post_accumulate_grad_hook(lambda p: launched_at_hook.append(ps.counter.calls[key]))
    dp_bytes_after = []

    def after_microbatch(i):
        dp_bytes_after.append(sum(v for (kind, g), v in ps.counter.records.items() if g == "dp"))
        if i == 0:
            launched_at_hook.clear()                 # keep the synced (last) microbatch's record only
    ps.counter.reset()
    run_steps(model, opt, ps, tcfg, 1, on_microbatch=after_microbatch)
    return {"at_hook": launched_at_hook, "dp_bytes": dp_bytes_after, "buckets": len(opt.buffer.buckets),
            "total_calls": ps.counter.calls[key]}


def test_buckets_launch_during_backward_and_not_under_no_sync():
    for r in spawn(2, overlap_worker):
        at = r["at_hook"]
        assert r["buckets"] >= 3 and r["total_calls"] == r["buckets"]
        assert r["dp_bytes"][0] == 0, "nothing may be reduced on a non-final microbatch"
        assert r["dp_bytes"][1] > 0
        assert at[-2] >= 1, f"the first bucket must launch before the last hook fires: {at}"
        assert at[-1] == r["buckets"], f"every bucket launches from a hook, none waits for step(): {at}"
        assert at == sorted(at) and len(set(at)) >= 3, f"launches spread over backward: {at}"


def launch_phase_worker(rank, world, bucket_mb, during):
    """One step of DP2 (plain all-reduce buckets) with torch.distributed.all_reduce intercepted: the phase
    (forward i, backward i, after backward) each bucket's collective was launched in, and the reduced
    gradients. during=False keeps sync off on every microbatch, so finish_grad_sync launches every
    bucket after backward (the path without overlap)."""
    mcfg, tcfg = model_cfg(), train_cfg(world)
    ps = ParallelState.create()
    model = build_model(mcfg, ps, seed=tcfg.seed)
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(bucket_size_mb=bucket_mb, distributed_optimizer=False),
                          mcfg)
    tokens, labels = data(mcfg, 1)[0]
    rows = GLOBAL_BATCH // world
    mine = slice(rank * rows, (rank + 1) * rows)
    phase, launched, real = ["setup"], [], dist.all_reduce

    def spy(tensor, *args, **kwargs):
        launched.append(phase[0])
        return real(tensor, *args, **kwargs)
    dist.all_reduce = spy
    try:
        opt.zero_grad()
        for i, (t, lab) in enumerate(zip(tokens[mine].chunk(MICRO), labels[mine].chunk(MICRO))):
            opt.set_sync(during and i == MICRO - 1)
            phase[0] = f"forward {i}"
            loss = model(t, lab).float().sum() / tokens.numel()
            phase[0] = f"backward {i}"
            opt.scale_loss(loss).backward()
        phase[0] = "after backward"
        opt.buffer.finish_grad_sync()
    finally:
        dist.all_reduce = real
    return {"launched": launched, "buckets": len(opt.buffer.buckets),
            "grads": {n: p.main_grad.clone() for n, p in model.named_parameters()}}


def test_bucket_collectives_start_inside_the_last_backward_and_match_the_after_backward_path():
    last = f"backward {MICRO - 1}"
    during = spawn(2, launch_phase_worker, 0.02, True)
    after = spawn(2, launch_phase_worker, 0.02, False)
    one_bucket = spawn(2, launch_phase_worker, 1000.0, False)
    for d, a, o in zip(during, after, one_bucket):
        assert d["buckets"] >= 3 and o["buckets"] == 1
        assert d["launched"] == [last] * d["buckets"], \
            f"every bucket's all-reduce must start inside the last backward: {d['launched']}"
        assert a["launched"] == ["after backward"] * a["buckets"], a["launched"]
        for name, g in d["grads"].items():             # the same sums, bit for bit, whenever they start
            assert torch.equal(g, a["grads"][name]), name
            assert torch.equal(g, o["grads"][name]), name


# ------------------------------------------------------------------ checkpoint export / import

def ckpt_worker(rank, world):
    mcfg, tcfg = model_cfg(), train_cfg(world)
    pcfg = ParallelConfig(bucket_size_mb=0.05)
    ps = ParallelState.create()
    model = build_model(mcfg, ps, seed=tcfg.seed)
    opt = build_optimizer([model], ps, tcfg, pcfg, mcfg)
    run_steps(model, opt, ps, tcfg, 3)
    state = opt.state_for_checkpoint()
    run_steps(model, opt, ps, tcfg, 2, start=3)
    # a fresh model with other weights, loaded from the checkpoint, continues identically
    model2 = build_model(mcfg, ps, seed=tcfg.seed + 1)
    opt2 = build_optimizer([model2], ps, tcfg, pcfg, mcfg)
    opt2.load_from_checkpoint(state)
    run_steps(model2, opt2, ps, tcfg, 2, start=3)
    opt.finish_param_sync()
    opt2.finish_param_sync()
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    ranges = {n: (e["start"], e["end"]) for n, e in state.items() if isinstance(e, dict)}
    return {"same": same, "ranges": ranges, "step": state["step"],
            "numel": {n: p.numel() for n, p in model.named_parameters()}}


def test_checkpoint_roundtrip_and_ranges_cover_each_param_once():
    res = spawn(2, ckpt_worker)
    assert all(r["same"] for r in res) and all(r["step"] == 3 for r in res)
    for name, numel in res[0]["numel"].items():
        pieces = sorted(r["ranges"][name] for r in res if name in r["ranges"])
        assert pieces[0][0] == 0 and pieces[-1][1] == numel, name
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:])), f"{name}: {pieces}"


# ------------------------------------------------------------------ DP x TP x PP through the pipeline engine

def engine_step(engine, opt, ps, cfg, step):
    """One training step of this rank's share of global batch `step` through the engine:
    (per-microbatch loss sums, the optimizer's stats)."""
    tokens, labels = data(cfg.model)[step]
    rows = GLOBAL_BATCH // ps.dp.size
    mine = slice(ps.dp.rank * rows, (ps.dp.rank + 1) * rows)
    mbs = list(zip(tokens[mine].chunk(MICRO), labels[mine].chunk(MICRO)))
    opt.zero_grad()
    opt.set_sync(False)
    per_mb = engine.forward_backward(lambda i: mbs[i], MICRO, opt.loss_scale / tokens.numel(),
                                     before_last_backward=lambda: opt.set_sync(True))
    return per_mb, opt.step(lr_at(step, cfg.train))


def engine_worker(rank, world, cfg):
    """The same run through the pipeline engine's 1F1B schedule: the training loop's own path."""
    from megagpt.pipeline.split import build_stage
    p, t = cfg.parallel, cfg.train
    ps = ParallelState.create(tp=p.tp, pp=p.pp)
    chunks = build_stage(cfg, ps, seed=t.seed)
    opt = build_optimizer(chunks, ps, t, p, cfg.model)
    norms = engine_steps(chunks, opt, ps, cfg)
    opt.finish_param_sync()
    params = {n: v for c in chunks for n, v in full_params(c, ps).items()}
    return {"params": params, "norms": norms} if ps.dp.rank == 0 and ps.tp.rank == 0 else None


def engine_steps(chunks, opt, ps, cfg) -> list:
    """STEPS training steps of this rank's chunks through the pipeline engine; returns the grad norms."""
    from megagpt.pipeline.engine import PipelineEngine
    p, t = cfg.parallel, cfg.train
    seq = SEQ // p.tp if p.sequence_parallel else SEQ
    engine = PipelineEngine(chunks, ps, cfg, (seq, t.micro_batch_size, cfg.model.hidden_size), torch.float32)
    return [engine_step(engine, opt, ps, cfg, step)[1]["grad_norm"] for step in range(STEPS)]


# (tp, pp, vp, layers): DP2xTP2xPP2 with SP (world 8), and DP2xPP2 interleaved with 2 chunks per rank
PIPE = [(2, 2, 1, 2), (1, 2, 2, 4)]


@pytest.mark.parametrize("tp,pp,vp,layers", PIPE, ids=[f"dp2-tp{t}-pp{p}-vp{v}" for t, p, v, _ in PIPE])
def test_dp_tp_pp_tied_with_pipeline_engine(tp, pp, vp, layers):
    """Tied embeddings: the first and last stage each hold a copy whose gradients are summed. Buckets
    of 1 MB hold all of a stage's params, so only the own-bucket rule gives both copies the same shards."""
    from megagpt.config import Config
    mcfg = model_cfg(tie_embeddings=True, num_layers=layers)
    cfg = Config(model=mcfg, train=train_cfg(2),
                 parallel=ParallelConfig(tp=tp, pp=pp, vp=vp, sequence_parallel=tp > 1, bucket_size_mb=1.0,
                                         world_size=2 * tp * pp))
    ref = serial_reference(True, layers)
    res = [r for r in spawn(2 * tp * pp, engine_worker, cfg, timeout=300) if r is not None]
    assert len(res) == pp
    for r in res:
        for step, (n, nr) in enumerate(zip(r["norms"], ref["norms"])):
            assert abs(n - nr) <= 1e-5 * nr, f"step {step}: grad norm {n} != serial {nr}"
    assert torch.equal(res[0]["params"]["embedding.weight"], res[-1]["params"]["embedding.weight"])
    got = {n: v for r in res for n, v in r["params"].items()}
    compare_params(got, ref["params"], mcfg.vocab_size)
