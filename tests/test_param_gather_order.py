"""parallel.overlap_param_gather launches the parameter all-gathers in the order the next forward needs them.

test_param_gather_overlap.py checks which buckets are still pending at each module, but pending is
the optimizer's own bookkeeping: launched last layers first, the first module's wait would sit
behind every other gather (collectives on one group complete in launch order) and nothing would
overlap, yet it passed. Here the all-gathers are seen where torch.distributed is called (their
output tensor names the bucket), and the order in which the forward needs the buckets is read by
pre-hooks on every parameter-owning module (registered after the optimizer's, so they see what its
waits left pending). A bucket needed earlier must be launched earlier, and each bucket once a step.
DP2, and DP2 x PP2 interleaved (2 chunks per rank) through the pipeline engine.
"""
import pytest
import torch
import torch.distributed as dist

from dist import spawn
from megagpt.config import Config, ParallelConfig
from megagpt.optim.optimizer import build_optimizer
from megagpt.parallel.state import ParallelState
from test_optim_dp import SEQ, engine_step, model_cfg, train_cfg


def order_worker(rank, world, cfg):
    from megagpt.pipeline.engine import PipelineEngine
    from megagpt.pipeline.split import build_stage
    p, t = cfg.parallel, cfg.train
    ps = ParallelState.create(tp=p.tp, pp=p.pp)
    chunks = build_stage(cfg, ps, seed=t.seed)
    opt = build_optimizer(chunks, ps, t, p, cfg.model)
    engine = PipelineEngine(chunks, ps, cfg, (SEQ, t.micro_batch_size, cfg.model.hidden_size), torch.float32)
    buf = opt.buffer
    at = {b.start * buf.data.element_size(): b.index for b in buf.buckets}   # byte offset in the buffer -> bucket
    launched = []
    names = [n for n in ("all_gather_single", "all_gather_into_tensor", "_all_gather_base") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}

    def recorder(fn):
        def call(out, *args, **kwargs):
            launched.append(at.get(out.data_ptr() - buf.data.data_ptr(), ("elsewhere", out.data_ptr())))
            return fn(out, *args, **kwargs)
        return call
    engine_step(engine, opt, ps, cfg, 0)        # the first step: every weight is in place before it
    for n in names:
        setattr(dist, n, recorder(saved[n]))
    try:
        engine_step(engine, opt, ps, cfg, 1)    # its step() launches the gathers the next forward waits on
    finally:
        for n in names:
            setattr(dist, n, saved[n])
    snapshots = [set(opt.update.pending)]
    hooks = [m.register_forward_pre_hook(lambda *_: snapshots.append(set(opt.update.pending)))
             for c in chunks for m in c.modules() if list(m.parameters(recurse=False))]
    engine_step(engine, opt, ps, cfg, 2)
    for h in hooks:
        h.remove()
    needed = {}                                 # bucket -> index of the module whose start it had to be in by
    for i, (before, after) in enumerate(zip(snapshots, snapshots[1:])):
        for b in before - after:
            needed.setdefault(b, i)
    return {"launched": launched, "needed": needed, "buckets": len(buf.buckets)}


# (pp, vp, layers)
CASES = {"dp2": (1, 1, 2), "dp2-pp2-vp2": (2, 2, 4)}


@pytest.mark.parametrize("case", list(CASES))
def test_gathers_launch_in_the_order_the_forward_needs_them(case):
    pp, vp, layers = CASES[case]
    mcfg = model_cfg(num_layers=layers)
    cfg = Config(model=mcfg, train=train_cfg(2),
                 parallel=ParallelConfig(pp=pp, vp=vp, bucket_size_mb=0.02, overlap_param_gather=True,
                                         world_size=2 * pp))
    for r in spawn(2 * pp, order_worker, cfg, timeout=300):
        launched, needed = r["launched"], r["needed"]
        assert sorted(launched, key=str) == list(range(r["buckets"])), f"each bucket gathered once: {launched}"
        assert sorted(needed) == list(range(r["buckets"])) and r["buckets"] >= 3, needed
        by_need = sorted(launched, key=lambda b: needed[b])      # stable: ties keep their launch order
        assert launched == by_need, f"launched {launched}, but the forward needs them in the order {by_need}"
