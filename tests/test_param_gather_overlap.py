"""The distributed optimizer's parameter all-gather, overlapped with the next forward bucket by bucket.

With parallel.overlap_param_gather, step() only launches one all-gather per bucket; each module's
forward pre-hook waits on its own buckets. The same run with the flag off (every gather finished
inside step()) must give bit-identical losses, grad norms and parameters, and move the same bytes.
The probes show that the waits really are spread over the forward (not all at its first module),
and that with interleaving each chunk waits for its own buckets only when it runs.
"""
import pytest
import torch

from dist import spawn
from megagpt.config import Config, ParallelConfig
from megagpt.model.gpt import build_model
from megagpt.optim.optimizer import build_optimizer
from megagpt.parallel.state import ParallelState
from test_optim_dp import MICRO, SEQ, engine_step, model_cfg, run_steps, train_cfg

STEPS = 3


def probe(modules, opt, seen):
    """Pre-hooks registered after the optimizer's, so they run after its waits: the buckets still
    pending when each parameter-owning module starts."""
    for m in modules:
        if list(m.parameters(recurse=False)):
            m.register_forward_pre_hook(lambda *_: seen.append(set(opt.update.pending)))


def dp_worker(rank, world):
    mcfg, tcfg = model_cfg(), train_cfg(world)
    ps = ParallelState.create()
    out = {}
    for overlap in (False, True):
        model = build_model(mcfg, ps, seed=tcfg.seed)
        opt = build_optimizer([model], ps, tcfg, ParallelConfig(bucket_size_mb=0.02, overlap_param_gather=overlap),
                              mcfg)
        ps.counter.reset()
        norms, losses, _ = run_steps(model, opt, ps, tcfg, STEPS - 1)
        bytes_ = dict(ps.counter.records)
        stale = [p.detach().clone() for p in model.parameters()]     # before any pending gather is waited on
        seen = []
        probe(model.modules(), opt, seen)
        n, l, _ = run_steps(model, opt, ps, tcfg, 1, start=STEPS - 1)
        opt.finish_param_sync()
        out[overlap] = {"norms": norms + n, "losses": losses + l, "bytes": bytes_, "seen": seen,
                        "stale": stale, "params": [p.detach().clone() for p in model.parameters()],
                        "buckets": len(opt.buffer.buckets)}
    off, on = out[False], out[True]
    changed = sum(not torch.equal(a, b) for a, b in zip(on["stale"], off["stale"]))
    return {"same": all(torch.equal(a, b) for a, b in zip(on["params"], off["params"])),
            "norms": (off["norms"], on["norms"]), "losses": (off["losses"], on["losses"]),
            "bytes": (off["bytes"], on["bytes"]), "seen": on["seen"][:len(on["seen"]) // MICRO],
            "seen_off": off["seen"], "buckets": on["buckets"], "stale_params": changed}


def test_dp2_overlap_is_bit_identical_and_waits_bucket_by_bucket():
    for r in spawn(2, dp_worker):
        assert r["same"], "parameters differ from the non-overlapped run"
        assert r["norms"][0] == r["norms"][1] and r["losses"][0] == r["losses"][1]
        assert r["bytes"][0] == r["bytes"][1], "the overlap must move the same bytes"
        assert r["stale_params"] > 0, "after step() some weights must still be in flight (else nothing overlaps)"
        assert all(not s for s in r["seen_off"]), "without overlap nothing is pending in the forward"
        counts = [len(s) for s in r["seen"]]          # pending buckets at each module of the first microbatch
        assert counts[0] == r["buckets"] - 1, f"the first module waits on its own bucket only: {counts}"
        assert counts == sorted(counts, reverse=True) and counts[-1] == 0, counts
        assert len(set(counts)) >= 3, f"the waits must spread over the forward: {counts}"


# ------------------------------------------------------------------ through the pipeline engine

def engine_worker(rank, world, cfg):
    from megagpt.pipeline.engine import PipelineEngine
    from megagpt.pipeline.split import build_stage
    p, t = cfg.parallel, cfg.train
    ps = ParallelState.create(tp=p.tp, pp=p.pp)
    seq = SEQ // p.tp if p.sequence_parallel else SEQ
    out = {}
    for overlap in (False, True):
        par = ParallelConfig(**{**vars(p), "overlap_param_gather": overlap})
        chunks = build_stage(cfg, ps, seed=t.seed)
        opt = build_optimizer(chunks, ps, t, par, cfg.model)
        engine = PipelineEngine(chunks, ps, cfg, (seq, t.micro_batch_size, cfg.model.hidden_size), torch.float32)
        norms, losses, at_chunk_start = [], [], {}
        for k, c in enumerate(chunks):    # the buckets still pending when each chunk's first forward starts
            c.register_forward_pre_hook(
                lambda *_, k=k: [at_chunk_start.setdefault(k, set(opt.update.pending))] and None)
        for step in range(STEPS):
            at_chunk_start.clear()
            per_mb, stats = engine_step(engine, opt, ps, cfg, step)
            losses.append([x.item() for x in per_mb])
            norms.append(stats["grad_norm"])
        opt.finish_param_sync()
        own = [{b.index for b in opt.buffer.buckets if any(id(q) in {id(x) for x in c.parameters()}
                                                           for q in b.params)} for c in chunks]
        out[overlap] = {"params": [q.detach().clone() for c in chunks for q in c.parameters()],
                        "norms": norms, "losses": losses, "own": own,
                        "starts": [at_chunk_start[k] for k in range(len(chunks))]}
    off, on = out[False], out[True]
    return {"same": all(torch.equal(a, b) for a, b in zip(on["params"], off["params"])),
            "norms": (off["norms"], on["norms"]), "losses": (off["losses"], on["losses"]),
            "starts": on["starts"], "own": on["own"], "tied": any(hasattr(c, "embedding") and c.post_process
                                                                 and not c.pre_process for c in chunks)}


# (tp, pp, vp, layers): DP2xTP2xPP2 with SP (world 8), DP2xPP2 interleaved with 2 chunks per rank; both tied
PIPE = [(2, 2, 1, 2), (1, 2, 2, 4)]


@pytest.mark.parametrize("tp,pp,vp,layers", PIPE, ids=[f"dp2-tp{t}-pp{p}-vp{v}" for t, p, v, _ in PIPE])
def test_pipeline_overlap_is_bit_identical(tp, pp, vp, layers):
    mcfg = model_cfg(tie_embeddings=True, num_layers=layers)
    cfg = Config(model=mcfg, train=train_cfg(2),
                 parallel=ParallelConfig(tp=tp, pp=pp, vp=vp, sequence_parallel=tp > 1, bucket_size_mb=0.02,
                                         world_size=2 * tp * pp))
    res = spawn(2 * tp * pp, engine_worker, cfg, timeout=300)
    assert any(r["tied"] for r in res), "the last stage must hold the tied embedding's copy"
    for r in res:
        assert r["same"], "parameters differ from the non-overlapped run"
        assert r["norms"][0] == r["norms"][1] and r["losses"][0] == r["losses"][1]
        # each chunk's first forward after a step starts with its own buckets still in flight: chunk k
        # waits on them itself, not at an earlier chunk's start
        for k, (pending, own) in enumerate(zip(r["starts"], r["own"])):
            assert own <= pending, f"chunk {k}: its buckets {own} were waited on before it ran ({pending})"
