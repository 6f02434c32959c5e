"""Counts every torch.distributed collective and point-to-point call made inside a `with` block.

    with CommInterceptor(group_names(ps)) as seen:
        trainer.run()
    assert dict(seen.records) == dict(ps.counter.records)

The functions are replaced on both torch.distributed and torch.distributed.distributed_c10d (so
`dist.P2POp(dist.isend, ...)` keeps passing torch's own checks), and restored on exit. Each call is
recorded once, at the outermost call (torch's own nesting, e.g. batch_isend_irecv calling isend, is
not counted twice), under (kind, group name), with the bytes the caller handed over: the input for
collectives (the whole input of a reduce-scatter, this rank's piece of an all-gather), the tensor
of a send or a receive, each P2POp of a batch on its own. Asynchronous calls count when issued.
Barriers and object collectives count as calls with 0 bytes.
"""
from __future__ import annotations

import functools
import inspect
import threading
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


# name -> (kind, the argument whose bytes count; None: a call of 0 bytes)
SPEC = {
    "all_reduce": ("all_reduce", "tensor"), "all_reduce_coalesced": ("all_reduce", "tensors"),
    "all_gather": ("all_gather", "tensor"), "all_gather_into_tensor": ("all_gather", "input_tensor"),
    "all_gather_single": ("all_gather", "input_tensor"), "_all_gather_base": ("all_gather", "input_tensor"),
    "all_gather_coalesced": ("all_gather", "input_tensor_list"),
    "reduce_scatter": ("reduce_scatter", "input_list"), "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "_reduce_scatter_base": ("reduce_scatter", "input"), "reduce_scatter_single": ("reduce_scatter", "input"),
    "broadcast": ("broadcast", "tensor"), "reduce": ("reduce", "tensor"), "gather": ("gather", "tensor"),
    "scatter": ("scatter", "scatter_list"),
    "all_to_all": ("all_to_all", "input_tensor_list"), "all_to_all_single": ("all_to_all", "input"),
    "send": ("send", "tensor"), "isend": ("send", "tensor"), "recv": ("recv", "tensor"), "irecv": ("recv", "tensor"),
    "barrier": ("barrier", None), "monitored_barrier": ("barrier", None),
    "all_gather_object": ("all_gather_object", None), "broadcast_object_list": ("broadcast_object_list", None),
    "gather_object": ("gather_object", None), "scatter_object_list": ("scatter_object_list", None),
    "send_object_list": ("send_object_list", None), "recv_object_list": ("recv_object_list", None),
}


def group_names(ps) -> dict:
    """{id(process group): name} for a ParallelState's groups; the default group is "world"."""
    out = {}
    for g in [*ps.groups.values(), ps.embedding]:
        if g.pg is not None:
            out[id(g.pg)] = g.name
    return out


class CommInterceptor:
    def __init__(self, names: dict):
        self.names = dict(names)
        self.records: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self._depth = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    def group_name(self, pg) -> str:
        if pg is None or pg is dist.group.WORLD:
            return "world"
        return self.names.get(id(pg), f"unknown group {dist.get_process_group_ranks(pg)}")

    def _add(self, kind: str, pg, nbytes: int) -> None:
        key = (kind, self.group_name(pg))
        self.records[key] += nbytes
        self.calls[key] += 1

    def _wrap(self, name: str, fn):
        kind, arg = SPEC.get(name, (None, None))
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                if name == "batch_isend_irecv":
                    for op in args[0] if args else kwargs["p2p_op_list"]:
                        is_send = op.op in (dist.isend, c10d.isend) or getattr(op.op, "__name__", "") == "isend"
                        self._add("send" if is_send else "recv", op.group, _nbytes(op.tensor))
                else:
                    bound = sig.bind(*args, **kwargs)
                    self._add(kind, bound.arguments.get("group"), _nbytes(bound.arguments.get(arg)) if arg else 0)
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
        return wrapper

    def __enter__(self):
        for name in [*SPEC, "batch_isend_irecv"]:
            fn = getattr(c10d, name, None) or getattr(dist, name, None)
            if fn is None:
                continue
            wrapper = self._wrap(name, fn)
            for module in (dist, c10d):
                if getattr(module, name, None) is fn:
                    self._saved.append((module, name, fn))
                    setattr(module, name, wrapper)
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()
        return False
