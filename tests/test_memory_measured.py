"""Bytes per rank measured from the optimizer's tensors on the CPU, against 2 + 4 + 12/d per parameter
(bf16 weights, fp32 grad buffer, fp32 main params + Adam moments sharded over d DP ranks) and
against the analytic model in megagpt.memory."""
import functools

import pytest
import torch
import torch._dynamo  # noqa: F401  torch.optim.Optimizer imports it lazily: once here, not in every forked rank

from dist import spawn
from megagpt.config import ParallelConfig
from megagpt.layout import Layout
from megagpt.model.gpt import build_model
from megagpt.optim.optimizer import DTYPES, build_optimizer
from megagpt.parallel.state import ParallelState
from test_optim_dp import model_cfg, run_steps, train_cfg


def memory_worker(rank, world, dtype, distributed, odd=False):
    mcfg, tcfg = model_cfg(odd), train_cfg(world, dtype=dtype)
    ps = ParallelState.create()
    model = build_model(mcfg, ps, seed=tcfg.seed, dtype=DTYPES[dtype])
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(distributed_optimizer=distributed, bucket_size_mb=0.05),
                          mcfg)
    run_steps(model, opt, ps, tcfg, 1)              # torch's AdamW (the plain path) makes its state lazily
    return {**opt.memory_bytes(), "params": sum(p.numel() for p in model.parameters()),
            "padding": opt.buffer.padding(), "buckets": len(opt.buffer.buckets)}


@functools.lru_cache(maxsize=None)
def measure(d: int, dtype: str, distributed: bool, odd: bool = False) -> list:
    return spawn(d, memory_worker, dtype, distributed, odd)


@pytest.mark.parametrize("d,odd", [(1, False), (2, False), (4, False), (4, True)],
                         ids=["dp1", "dp2", "dp4", "dp4-padded"])
def test_bf16_distributed_optimizer_bytes_per_param(d, odd):
    res = measure(d, "bf16", True, odd)
    psi, pad = res[0]["params"], res[0]["padding"]
    assert (pad > 0) == odd
    assert pad < res[0]["buckets"] * d, "padding: less than dp elements per bucket"
    for r in res:
        assert r["weights"] == 2 * psi, "bf16 weights"
        assert r["grads"] == 4 * (psi + pad), "fp32 gradient buffer over every parameter"
        owned = r["optimizer"] / 12                      # fp32 main + exp_avg + exp_avg_sq per owned element
        assert abs(owned - psi / d) <= pad, f"optimizer state {r['optimizer']} B != 12*Psi/d = {12 * psi / d}"
        per_param = (r["weights"] + r["grads"] + r["optimizer"]) / psi
        assert per_param == pytest.approx(6 + 12 / d, abs=16 * pad / psi + 1e-12)
    assert sum(r["optimizer"] for r in res) == 12 * psi, "the shards cover every parameter exactly once"


@pytest.mark.parametrize("dtype,distributed,expected", [("bf16", False, (2, 4, 12)), ("fp32", True, (4, 4, 4))])
def test_plain_and_fp32_bytes_per_param(dtype, distributed, expected):
    """Plain optimizer: 18 B/param on every rank. fp32 with ZeRO-1 over 2: the weights are the main
    params, so the optimizer holds only the two moments of its half, 8/2."""
    res = measure(2, dtype, distributed)
    for r in res:
        psi, pad = r["params"], r["padding"]
        got = (r["weights"] / psi, r["grads"] / psi, r["optimizer"] / psi)
        assert got == pytest.approx(expected, abs=16 * pad / psi + 1e-12), got


@pytest.mark.parametrize("d,dtype,distributed", [(1, "bf16", True), (2, "bf16", True), (4, "bf16", True),
                                                 (2, "bf16", False), (2, "fp32", True)])
def test_agrees_with_the_analytic_memory_model(d, dtype, distributed):
    memory = pytest.importorskip("megagpt.memory", reason="megagpt/memory.py (the analytic model) is not there yet")
    mcfg, tcfg = model_cfg(), train_cfg(d, dtype=dtype)
    measured = measure(d, dtype, distributed)[0]
    layout = Layout(world_size=d, seq_len=tcfg.seq_len, micro_batch=tcfg.micro_batch_size,
                    global_batch=2 * tcfg.micro_batch_size * d)
    model = memory.memory_per_rank(mcfg, layout, dtype=dtype, distributed_optimizer=distributed)
    for key in ("weights", "grads", "optimizer"):
        assert measured[key] == pytest.approx(model[key], rel=0.10), \
            f"{key}: measured {measured[key]} B, memory_per_rank {model[key]:.0f} B"
