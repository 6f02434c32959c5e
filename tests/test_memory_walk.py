"""Bytes per parameter measured from outside: every tensor reachable from the model and the optimizer
(which holds the grad buffer), found by walking attributes, dicts, lists and objects recursively,
each storage counted once (views share it). The optimizer's own report is not consulted, so a
copy it keeps without reporting it is counted like any other. After one step (torch's AdamW makes
its state lazily): bf16 weights with ZeRO-1 over d ranks hold 2 + 4 + 12/d bytes per parameter."""
import types

import pytest
import torch
import torch._dynamo  # noqa: F401  torch.optim.Optimizer imports it lazily: once here, not in every forked rank

from dist import spawn
from megagpt.config import ParallelConfig
from megagpt.model.gpt import build_model
from megagpt.optim import DTYPES, build_optimizer
from megagpt.parallel.state import ParallelState
from test_optim_dp import model_cfg, run_steps, train_cfg

_LEAVES = (str, bytes, int, float, bool, complex, type(None), type, types.ModuleType, types.FunctionType,
           types.MethodType, types.BuiltinFunctionType, torch.dtype, torch.device, torch.Size)


def reachable_storages(*roots) -> dict[int, int]:
    """{storage address: bytes} of every tensor reachable from `roots` (a tensor's .grad and attributes
    such as main_grad included; dict keys too, as torch.optim keys its state by parameter)."""
    seen, storages, stack = set(), {}, list(roots)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            s = obj.untyped_storage()
            if s.nbytes():
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(vars(obj).values())
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.extend(getattr(obj, name) for name in getattr(type(obj), "__slots__", ()) if hasattr(obj, name))
    return storages


def walk_worker(rank, world, dtype, distributed, odd):
    mcfg, tcfg = model_cfg(odd), train_cfg(world, dtype=dtype)
    ps = ParallelState.create()
    model = build_model(mcfg, ps, seed=tcfg.seed, dtype=DTYPES[dtype])
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(distributed_optimizer=distributed, bucket_size_mb=0.05),
                          mcfg)
    run_steps(model, opt, ps, tcfg, 1)
    everything = reachable_storages(model, opt, opt.buffer)
    per_param = reachable_storages(*[(p, p.main_grad) for p in model.parameters()])
    tables = {k: n for k, n in reachable_storages(model).items() if k not in per_param}   # RoPE cos/sin
    return {"params": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
            "padding": opt.buffer.padding(), "weights": sum(p.untyped_storage().nbytes() for p in model.parameters()),
            "tables": sum(tables.values()), "total": sum(everything.values())}


# (d, dtype, ZeRO-1, odd sizes) -> bytes per parameter
CASES = {"dp1-bf16-zero1": ((1, "bf16", True, False), 6 + 12 / 1),
         "dp2-bf16-zero1": ((2, "bf16", True, False), 6 + 12 / 2),
         "dp4-bf16-zero1": ((4, "bf16", True, False), 6 + 12 / 4),
         "dp4-bf16-zero1-padded": ((4, "bf16", True, True), 6 + 12 / 4),
         "dp2-bf16-plain": ((2, "bf16", False, False), 2 + 4 + 12),
         "dp2-fp32-zero1": ((2, "fp32", True, False), 4 + 4 + 8 / 2)}


@pytest.mark.parametrize("case", list(CASES))
def test_reachable_bytes_per_param(case):
    (d, dtype, distributed, odd), want = CASES[case]
    for r in spawn(d, walk_worker, dtype, distributed, odd):
        psi, pad = r["params"], r["padding"]
        assert r["weights"] == psi * DTYPES[dtype].itemsize, "each parameter in a storage of its own size"
        assert r["tables"] <= 0.01 * psi, f"the model holds {r['tables']} B besides its parameters"
        # bucket padding (fp32 grads, and an owned shard may be up to pad elements longer); one 8-byte
        # step counter per parameter tensor in torch's AdamW
        slack = 16 * pad + 8 * r["tensors"]
        total = r["total"] - r["tables"]
        assert abs(total - want * psi) <= slack, \
            f"{total} B reachable = {total / psi:.4f} B/param, expected {want:.4f} (+- {slack / psi:.4f})"
