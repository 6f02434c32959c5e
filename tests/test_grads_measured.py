"""The reduced DP gradients, measured where the update reads them, against the one-process gradients.

Adam's update g / sqrt(v) cancels a constant scale on a gradient element, so comparing parameters
after the update cannot see a gradient that is uniformly 1% off. Here each rank's optimizer update
is wrapped: just before it runs (after the DP reduction, the TP/tied-embedding completion and the
clipping), every parameter's `main_grad` is read where this DP rank owns it (ZeRO-1: its shard of
every bucket; plain: everything), the owned pieces are combined over DP and gathered over TP into
the global tensor, and every step's gradients must equal the one-process clipped gradients to 1e-5
relative. Every layout of test_optim_dp.py with DP > 1, and the plain (non-ZeRO) optimizer under
DP2 x TP2, DP2 x PP2 and DP2 x TP2 x PP2, all through the pipeline engine; the grad norms and the
parameters after the 5 steps are compared too.
"""
import pytest
import torch
import torch.distributed as dist

from dist import assert_close_rel, gather_full, spawn
from megagpt.config import Config, ParallelConfig
from megagpt.optim import build_optimizer
from megagpt.parallel.state import ParallelState
from test_optim_dp import STEPS, compare_params, engine_steps, full_params, model_cfg, serial_reference, train_cfg


def reduced_grads(chunks, opt, ps) -> tuple[dict, dict]:
    """({name: global gradient}, {name: (min, max) owners per element}) as the update is about to read them.

    Each main_grad is a view into a flat buffer; owned_views() are the pieces of that buffer whose
    reduced value this rank holds. Positions are storage offsets, so nothing else of the buffer's
    internals is assumed."""
    flats = {}                                               # storage ptr -> [whole storage] view
    for c in chunks:
        for p in c.parameters():
            s = p.main_grad.untyped_storage()
            flats.setdefault(s.data_ptr(), torch.empty(0, dtype=p.main_grad.dtype).set_(s))
    values = {k: torch.zeros_like(f) for k, f in flats.items()}
    owners = {k: torch.zeros_like(f) for k, f in flats.items()}
    for v in opt.buffer.owned_views():
        k, off = v.untyped_storage().data_ptr(), v.storage_offset()
        assert v.is_contiguous() and k in flats
        values[k][off:off + v.numel()] = v.reshape(-1)
        owners[k][off:off + v.numel()] += 1
    for k in flats:                                          # same storages, same order on every DP rank
        if ps.dp.size > 1:
            dist.all_reduce(values[k], group=ps.dp.pg)
            dist.all_reduce(owners[k], group=ps.dp.pg)
    grads, counts = {}, {}
    for i, c in enumerate(chunks):
        for name, p in c.named_parameters():
            g = p.main_grad
            k, off, n = g.untyped_storage().data_ptr(), g.storage_offset(), g.numel()
            own = owners[k][off:off + n]
            counts[f"{i}/{name}"] = (own.min().item(), own.max().item())
            local = (values[k][off:off + n] / own.clamp(min=1)).view(p.shape)   # the mean of identical copies
            grads[f"{i}/{name}"] = gather_full(local, p.meta.spec, ps.tp)
    return grads, counts


def grads_worker(rank, world, cfg):
    from megagpt.pipeline.split import build_stage
    p, t = cfg.parallel, cfg.train
    ps = ParallelState.create(tp=p.tp, pp=p.pp)
    chunks = build_stage(cfg, ps, seed=t.seed)
    opt = build_optimizer(chunks, ps, t, p, cfg.model)
    captured = []
    update = opt.update.step

    def measured_update(*args, **kwargs):                    # the update rule, measured on its way in
        captured.append(reduced_grads(chunks, opt, ps))
        return update(*args, **kwargs)
    opt.update.step = measured_update
    norms = engine_steps(chunks, opt, ps, cfg)
    opt.finish_param_sync()
    params = {n: v for c in chunks for n, v in full_params(c, ps).items()}
    out = {"grads": [g for g, _ in captured], "owners": captured[0][1], "norms": norms, "params": params}
    return out if ps.dp.rank == 0 and ps.tp.rank == 0 else None


# (dp, tp, pp, vp, sp, ZeRO-1, odd sizes (padded buckets), tied embeddings, layers)
LAYOUTS = {
    "dp2-zero1": (2, 1, 1, 1, False, True, False, False, 2),
    "dp4-zero1": (4, 1, 1, 1, False, True, False, False, 2),
    "dp4-zero1-padded": (4, 1, 1, 1, False, True, True, False, 2),
    "dp2-tp2-sp-zero1": (2, 2, 1, 1, True, True, False, False, 2),
    "dp2-tp2-pp2-sp-zero1-tied": (2, 2, 2, 1, True, True, False, True, 2),
    "dp2-pp2-vp2-zero1-tied": (2, 1, 2, 2, False, True, False, True, 4),
    "dp2-plain": (2, 1, 1, 1, False, False, False, False, 2),
    "dp2-tp2-sp-plain": (2, 2, 1, 1, True, False, False, False, 2),
    "dp2-pp2-plain-tied": (2, 1, 2, 1, False, False, False, True, 2),
    "dp2-tp2-pp2-sp-plain-tied": (2, 2, 2, 1, True, False, False, True, 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reduced_grads_equal_serial_before_update(layout):
    dp, tp, pp, vp, sp, zero1, odd, tied, layers = LAYOUTS[layout]
    mcfg = model_cfg(odd, tie_embeddings=tied, num_layers=layers)
    cfg = Config(model=mcfg, train=train_cfg(dp),
                 parallel=ParallelConfig(tp=tp, pp=pp, vp=vp, sequence_parallel=sp, distributed_optimizer=zero1,
                                         bucket_size_mb=1.0 if tied else 0.05, world_size=dp * tp * pp))
    ref = serial_reference(tied, layers, odd)
    res = [r for r in spawn(dp * tp * pp, grads_worker, cfg, timeout=300) if r is not None]
    assert len(res) == pp
    for r in res:
        for name, (lo, hi) in r["owners"].items():    # ZeRO-1: each element owned once; plain: by all
            assert (lo, hi) == ((1, 1) if zero1 else (dp, dp)), f"{name}: owned by {lo}..{hi} DP ranks"
        assert len(r["grads"]) == STEPS
        for step, (got, want) in enumerate(zip(r["grads"], ref["grads"])):
            for key, g in got.items():
                name = key.split("/", 1)[1]
                w = want[name]
                assert_close_rel(g[:w.shape[0]], w, name=f"step {step} {name} grad")   # [:V]: vocab padding
        for step, (n, nr) in enumerate(zip(r["norms"], ref["norms"])):
            assert abs(n - nr) <= 1e-5 * nr, f"step {step}: grad norm {n} != serial {nr}"
    assert sorted({k.split("/", 1)[1] for r in res for k in r["grads"][0]}) == sorted(ref["grads"][0])
    compare_params({n: v for r in res for n, v in r["params"].items()}, ref["params"], mcfg.vocab_size)
