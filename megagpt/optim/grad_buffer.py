"""A contiguous gradient buffer, cut into buckets that are reduced over DP from backward hooks.

Every trainable parameter gets `p.main_grad`, a view into one flat buffer [N] in the gradient
dtype (fp32 whatever the model's dtype: gradients are accumulated in fp32 over microbatches).
Parameters are laid out in reverse registration order (last chunk first), the order in which
backward produces their gradients, and cut into buckets of about `bucket_bytes`. A bucket never
spans two model chunks, so with interleaved pipelines each chunk's buckets close on their own.

A post-accumulate-grad hook adds p.grad into p.main_grad and frees p.grad. With `fuse_wgrad` (train.
grad_accum_fusion) the linear layers' weights are marked (parallel/tp_overlap.py's FUSE_WGRAD) when their
main_grad has their dtype: their backward adds the weight gradient into main_grad itself and flags the
weight (ADDED), so the hook skips the add and drops the placeholder p.grad; its bookkeeping is the same. While sync is on (the
last microbatch of a step), the hook counts the bucket's arrivals; when the whole bucket is in,
its DP reduction starts asynchronously and overlaps the rest of backward. `finish_grad_sync()`
launches what is left (parameters that got no gradient) and waits on every handle.

Each bucket is padded to a multiple of the DP size so it splits into `dp` equal shards. With the
distributed optimizer DP rank r owns shard r of every bucket and the reduction is a reduce-scatter
that leaves the sum in that shard (the other shards keep stale local values); otherwise it is an
all-reduce and every rank owns the whole bucket. Gradients are summed, not averaged: the training
loop divides the loss by the global token count, so the sum is the global mean.

Expert weights (ParamMeta.expert, model/moe.py) live on dp/ep ranks only, so their buckets are
reduced, and with the distributed optimizer sharded, over the expert-data-parallel group instead
(`Bucket.group`): a bucket holds either expert or dense parameters, never both, and every bucket
is padded to a multiple of dp, which edp divides.

After the update the reduced gradients are spent, so the distributed optimizer all-gathers each
bucket's updated weights into that bucket's own bytes (see adamw.py); `zero(skip=...)` leaves the
buckets whose gather is still in flight, and the optimizer zeroes each once it has copied it out.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..parallel.layers import meta_of
from ..parallel.state import Group
from ..parallel.tp_overlap import ADDED, FUSE_WGRAD


def plan_buckets(chunk_numels: list[list[int]], bucket_elems: int, dp: int,
                 alone: list[set[int]] | None = None,
                 kinds: list[list[int]] | None = None) -> list[tuple[int, list[int], int, int]]:
    """The bucket plan, from sizes alone (the grad buffer and comm_model both use it).

    chunk_numels: each model chunk's parameter sizes in registration order; alone: per chunk, the
    indices of parameters that sit in a bucket of their own; kinds: per chunk, each parameter's kind
    (0 dense, 1 expert): a bucket closes where the kind changes. Parameters are laid out last chunk first,
    last parameter first (the order backward produces them); a bucket closes once it holds
    bucket_elems or more, never spans two chunks, and is padded to a multiple of dp. Returns the
    buckets in buffer order: (chunk, parameter indices in buffer order, start, end)."""
    buckets, offset = [], 0

    def close(c, indices):
        nonlocal offset
        if indices:
            size = sum(chunk_numels[c][i] for i in indices)
            buckets.append((c, list(indices), offset, offset + -(-size // dp) * dp))   # padded
            offset = buckets[-1][3]

    for c in reversed(range(len(chunk_numels))):
        current, size = [], 0
        for i in reversed(range(len(chunk_numels[c]))):
            if alone and i in alone[c]:
                close(c, current)
                close(c, [i])
                current, size = [], 0
                continue
            if kinds and current and kinds[c][i] != kinds[c][current[-1]]:
                close(c, current)
                current, size = [], 0
            current.append(i)
            size += chunk_numels[c][i]
            if size >= bucket_elems:
                close(c, current)
                current, size = [], 0
        close(c, current)
    return buckets


@dataclass
class Bucket:
    index: int
    start: int                         # [start, end) in the buffer; end - start is a multiple of dp
    end: int
    params: list
    data: torch.Tensor | None = None   # buffer[start:end]
    arrived: set = field(default_factory=set)   # ids of params whose final gradient is in
    handle: object = None              # the async work, None when not launched or when dp == 1
    launched: bool = False
    group: Group | None = None         # dp, or edp for a bucket of expert weights


class GradBuffer:
    def __init__(self, chunk_params: list[list[nn.Parameter]], dp: Group, bucket_bytes: int,
                 reduce_scatter: bool, dtype: torch.dtype = torch.float32, own_bucket=(), device=None,
                 expert_dp: Group | None = None, fuse_wgrad: bool = False):
        """chunk_params: each model chunk's trainable params in registration order.
        own_bucket: params that must sit alone in a bucket (the tied embedding across pipeline
        stages: its shard boundaries must then be the same on the first and the last stage).
        expert_dp: the group of the expert weights' buckets (default: dp).
        fuse_wgrad: let the linear layers add their weight gradients straight into main_grad (a weight
        of another dtype than the buffer, bf16/fp16 against fp32, keeps the hook's add)."""
        self.dp, self.reduce_scatter, self.dtype = dp, reduce_scatter, dtype
        self.sync = True
        elem = torch.empty((), dtype=dtype).element_size()
        bucket_elems = max(1, int(bucket_bytes) // elem)
        alone = {id(p) for p in own_bucket}

        # 1. plan: buffer offsets of every param and the bucket boundaries
        self.param_range: dict[int, tuple[int, int]] = {}      # id(p) -> [start, end) in the buffer
        self.buckets: list[Bucket] = []
        numels = [[p.numel() for p in params] for params in chunk_params]
        lone = [{i for i, p in enumerate(params) if id(p) in alone} for params in chunk_params]
        kinds = [[int(meta_of(p).expert) for p in params] for params in chunk_params]
        offset = 0
        for c, indices, start, offset in plan_buckets(numels, bucket_elems, dp.size, lone, kinds):
            params = [chunk_params[c][i] for i in indices]
            at = start
            for p in params:
                self.param_range[id(p)] = (at, at + p.numel())
                at += p.numel()
            group = expert_dp if expert_dp is not None and kinds[c][indices[0]] else dp
            self.buckets.append(Bucket(len(self.buckets), start, offset, params, group=group))

        # 2. allocate the buffer and hand out the views
        device = device or (chunk_params[0][0].device if chunk_params and chunk_params[0] else None)
        self.data = torch.zeros(offset, dtype=dtype, device=device)   # [N]
        self.bucket_of: dict[int, Bucket] = {}
        for b in self.buckets:
            b.data = self.data[b.start:b.end]
            for p in b.params:
                s, e = self.param_range[id(p)]
                p.main_grad = self.data[s:e].view(p.shape)
                setattr(p, FUSE_WGRAD, fuse_wgrad and p.dtype == dtype)
                self.bucket_of[id(p)] = b
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                       for b in self.buckets for p in b.params]

    # ------------------------------------------------------------------ ownership
    def owned_range(self, b: Bucket) -> tuple[int, int]:
        """[lo, hi) of bucket b (buffer coordinates) whose reduced gradient this DP rank holds."""
        if not self.reduce_scatter:
            return b.start, b.end
        n = (b.end - b.start) // b.group.size
        return b.start + b.group.rank * n, b.start + (b.group.rank + 1) * n

    def owned_views(self) -> list[torch.Tensor]:
        return [self.data[lo:hi] for lo, hi in map(self.owned_range, self.buckets)]

    # ------------------------------------------------------------------ the hook and the reductions
    def _on_grad(self, p: nn.Parameter) -> None:
        if getattr(p, ADDED, False):          # fused: backward already added it; p.grad is a placeholder
            setattr(p, ADDED, False)
        else:
            p.main_grad.add_(p.grad)          # fp32 += bf16/fp16/fp32
        p.grad = None                          # the model-dtype gradient lives only this long
        if not self.sync:
            return
        b = self.bucket_of[id(p)]
        if b.launched:
            raise RuntimeError("grad buffer: a gradient arrived after its bucket was reduced; call "
                               "set_sync(False) (or use no_sync()) for all but the last microbatch")
        b.arrived.add(id(p))
        if len(b.arrived) == len(b.params):
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        if self.reduce_scatter:
            lo, hi = self.owned_range(b)
            # output aliases this rank's own shard of the input (in place, as Megatron does)
            b.handle = b.group.reduce_scatter_async(self.data[lo:hi], b.data)
        else:
            b.handle = b.group.all_reduce_async(b.data)
        b.launched = True

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet launched (in bucket order, the same on every DP rank), wait on all."""
        for b in self.buckets:
            if not b.launched:
                self._launch(b)
        self._wait_and_reset()

    def _wait_and_reset(self) -> None:
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
            b.handle, b.launched = None, False
            b.arrived.clear()

    # ------------------------------------------------------------------ control
    def set_sync(self, flag: bool) -> None:
        """True on the last microbatch of a step: buckets reduce as they fill. False: only accumulate."""
        self.sync = bool(flag)

    @contextlib.contextmanager
    def no_sync(self):
        previous = self.sync
        self.sync = False
        try:
            yield
        finally:
            self.sync = previous

    def zero(self, skip=()) -> None:
        """Zero the gradients. skip: indices of buckets whose bytes still carry a parameter all-gather
        (the optimizer zeroes each of those itself once it has copied the weights out)."""
        self._wait_and_reset()                 # never zero memory a collective is still reading
        if not skip:
            self.data.zero_()
            return
        for b in self.buckets:                 # the buckets tile the buffer
            if b.index not in skip:
                b.data.zero_()

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for b in self.buckets:                 # without the hook a fused gradient would be a placeholder
            for p in b.params:
                setattr(p, FUSE_WGRAD, False)

    def padding(self) -> int:
        """Elements of the buffer that belong to no parameter (bucket padding)."""
        return self.data.numel() - sum(e - s for s, e in self.param_range.values())
