"""Bytes per parameter measured from every tensor alive in the process, not only the reachable ones.

test_memory_walk.py follows attributes, dicts, lists and objects from the model and the optimizer;
a copy held in a closure, a functools.partial, a tensor hook or a module-level global is out of its
reach. Here each rank collects garbage, notes the storages of every live tensor (gc tracks them all),
builds the model and the optimizer, runs one step, collects again, and counts the storages that are
new (each once): they must come to 2 + 4 + 12/d bytes per parameter (bf16 weights, fp32 grad buffer,
fp32 main params + Adam moments over d ranks), besides the model's RoPE tables, within the same
slack as the walk (bucket padding, torch's 8-byte step counters)."""
import gc

import pytest
import torch
import torch._dynamo  # noqa: F401  torch.optim.Optimizer imports it lazily: once here, not in every forked rank

from dist import spawn
from megagpt.config import ParallelConfig
from megagpt.model.gpt import build_model
from megagpt.optim import DTYPES, build_optimizer
from megagpt.parallel.state import ParallelState
from test_memory_walk import reachable_storages
from test_optim_dp import model_cfg, run_steps, train_cfg


def live_storages() -> dict[int, int]:
    """{storage address: bytes} of every tensor object alive in this process."""
    gc.collect()
    out = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if s.nbytes():
                out[s.data_ptr()] = max(out.get(s.data_ptr(), 0), s.nbytes())
    return out


def live_worker(rank, world, dtype, distributed):
    mcfg, tcfg = model_cfg(), train_cfg(world, dtype=dtype)
    ps = ParallelState.create()
    before = live_storages()
    model = build_model(mcfg, ps, seed=tcfg.seed, dtype=DTYPES[dtype])
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(distributed_optimizer=distributed, bucket_size_mb=0.05),
                          mcfg)
    run_steps(model, opt, ps, tcfg, 1)
    new = {k: n for k, n in live_storages().items() if k not in before}
    per_param = reachable_storages(*[(p, p.main_grad) for p in model.parameters()])
    tables = {k: n for k, n in reachable_storages(model).items() if k not in per_param}   # RoPE cos/sin
    return {"params": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
            "padding": opt.buffer.padding(), "tables": sum(tables.values()), "total": sum(new.values())}


CASES = {"dp1-bf16-zero1": ((1, "bf16", True), 6 + 12 / 1),
         "dp2-bf16-zero1": ((2, "bf16", True), 6 + 12 / 2),
         "dp2-bf16-plain": ((2, "bf16", False), 2 + 4 + 12)}


@pytest.mark.parametrize("case", list(CASES))
def test_live_bytes_per_param(case):
    (d, dtype, distributed), want = CASES[case]
    for r in spawn(d, live_worker, dtype, distributed):
        psi, pad = r["params"], r["padding"]
        assert r["tables"] <= 0.01 * psi, f"the model holds {r['tables']} B besides its parameters"
        slack = 16 * pad + 8 * r["tensors"]
        total = r["total"] - r["tables"]
        assert abs(total - want * psi) <= slack, \
            f"{total} B newly alive = {total / psi:.4f} B/param, expected {want:.4f} (+- {slack / psi:.4f})"
