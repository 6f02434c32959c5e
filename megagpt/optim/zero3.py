"""ZeRO-3: the weights sharded over DP too, gathered one unit at a time.

Units: every transformer layer of a chunk is one unit; the chunk's other parameters are two root units:
the embedding (or a tied copy of it: alone, its shards line up with the other stage's, as in zero2),
and the final norm with the LM head. Each unit's weights live in one flat
tensor [size] of the param dtype whose storage is freed (resized to 0) when the unit is resharded;
the parameters stay the same nn.Parameter objects (names, ParamMeta), viewing that flat. What a rank
keeps is its slice of the flat (`pshard`, [size/d]; in fp32 it is the fp32 main params themselves).

The life of a layer's unit over one microbatch:
  forward pre-hook      all-gather it (or wait on its prefetch) in the param dtype, then start the
                        next layer's gather (prefetch);
  forward post-hook     reshard, and hook the output's gradient;
  output gradient hook  before the layer's backward: gather it again, prefetch the layer before;
  gradients             each param's gradient goes into the unit's fp32 flat (zero.py); when all are
                        in, the unit's reduce-scatter starts and the unit is resharded.
The root units (used first in forward and last in backward) are gathered by the chunk's forward
pre-hook and stay whole until the backward of every microbatch whose forward found them whole is
over: one gather per microbatch on a pipeline's last stage, one per step where several forwards run
before the first backward (comm_model._root_gathers reads this off the schedule).
Under full activation recompute the layer's forward runs again inside backward: its hooks see that
(a backward is running) and neither gather (the output hook already did) nor reshard, so a layer is
gathered twice per microbatch with or without recompute.

Bytes per parameter and rank, between steps: fp32 grads 4/d + Adam 8/d + main 4/d + the bf16 shard 2/d
(in fp32 the main params are the shard): 18/d in bf16, 16/d in fp32. During a microbatch add the units
that are whole (the root units, the running layer, the prefetched one) in the param dtype and the fp32
flats of the one or two units whose gradients are arriving or being reduced.
Traffic per microbatch: two all-gathers of every layer, the root units' as above, one reduce-scatter of
every unit; zero1 does one reduce-scatter and one all-gather per step, so with one microbatch in fp32
zero3 moves 1.5x less half the root units' share (tests/test_zero_accounting.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .zero import FlatGroup, ShardedOptimizer


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Zero3Optimizer(ShardedOptimizer):
    shard_params = True

    def __init__(self, chunks: list[nn.Module], ps, train_cfg, parallel_cfg):
        lists, self.kind = [], []
        for c in chunks:
            blocks = list(c.layers.values()) if hasattr(c, "layers") else []
            in_block = {id(p) for b in blocks for p in b.parameters()}
            rest = [(n, p) for n, p in c.named_parameters() if p.requires_grad and id(p) not in in_block]
            # the embedding (or its tied copy) is a unit of its own: its gradient comes last in backward,
            # so in one unit with the head the head's fp32 gradients would wait through all of backward
            emb = [p for n, p in rest if n.startswith("embedding.")]
            root = [p for n, p in rest if not n.startswith("embedding.")]
            for params, kind in [(emb, ("root", c)), (root, ("root", c))] + \
                    [([p for p in b.parameters() if p.requires_grad], ("layer", b)) for b in blocks]:
                if params:
                    lists.append(params)
                    self.kind.append(kind)
        super().__init__(chunks, ps, train_cfg, parallel_cfg, lists)
        self._flatten()
        self._unit_hooks = self._register()
        self.gathers = 0                                  # all-gathers issued (tests: none twice)

    @torch.no_grad()
    def _flatten(self) -> None:
        for g in self.groups:
            full = torch.zeros(g.size, dtype=self.param_dtype, device=g.grad.device)   # [size]
            for p in g.params:
                s, e = g.ranges[id(p)]
                full[s:e].copy_(p.detach().reshape(-1))
            self._bind(g, full)
            g.gather_handle, g.live = None, 0
            g.pshard = g.main if g.main.dtype == self.param_dtype else full[g.lo:g.hi].clone()   # [size/d]
            self._reshard(g)

    # ------------------------------------------------------------------ gather and reshard
    def _start_gather(self, g: FlatGroup) -> None:
        if g.state != "sharded":
            return
        storage = g.full.untyped_storage()
        storage.resize_(g.size * g.full.element_size())
        g.gather_handle = self.dp.all_gather_async(g.full, g.full[g.lo:g.hi].copy_(g.pshard))
        g.state = "gathering"
        self.gathers += 1

    def _need(self, g: FlatGroup) -> None:
        self._start_gather(g)
        if g.gather_handle is not None:
            g.gather_handle.wait()
        g.gather_handle, g.state = None, "whole"

    def _need_all(self, groups) -> None:
        for g in groups:
            self._need(g)

    @staticmethod
    def _bind(g: FlatGroup, full: torch.Tensor) -> None:
        """The params of g become views of `full`."""
        g.full = full
        for p in g.params:
            s, e = g.ranges[id(p)]
            p.data = full[s:e].view(p.shape)

    def _reshard(self, g: FlatGroup) -> None:
        if getattr(g, "state", None) == "gathering" and g.gather_handle is not None:
            g.gather_handle.wait()
        g.gather_handle = None
        if not g.full.untyped_storage().resizable():      # a checkpoint's writer shared it with numpy
            self._bind(g, torch.empty_like(g.full))
        g.full.untyped_storage().resize_(0)
        g.state = "sharded"

    def _group_done(self, g: FlatGroup) -> None:
        if self.kind[g.index][0] == "root":
            g.live -= 1
            if g.live > 0:                                # another microbatch's backward still needs it
                return
        self._reshard(g)

    def _root_forward(self, roots) -> None:
        """A chunk's forward: its root units whole until every microbatch in flight has done its backward."""
        self._need_all(roots)
        if torch.is_grad_enabled() and not _in_backward():
            for g in roots:
                g.live += 1

    # ------------------------------------------------------------------ hooks
    def _register(self) -> list:
        hooks = []
        for c in self.chunks:
            roots = [g for g, (kind, m) in zip(self.groups, self.kind) if kind == "root" and m is c]
            hooks.append(c.register_forward_pre_hook(lambda _m, _a, roots=roots: self._root_forward(roots)))
            blocks = {id(b) for b in (c.layers.values() if hasattr(c, "layers") else [])}
            layers = [(g, m) for g, (kind, m) in zip(self.groups, self.kind) if kind == "layer" and id(m) in blocks]
            for i, (g, module) in enumerate(layers):     # prefetch within the chunk, in forward order
                nxt = layers[i + 1][0] if i + 1 < len(layers) else None
                prev = layers[i - 1][0] if i > 0 else None
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, _a, g=g, nxt=nxt: self._pre_forward(g, nxt)))
                hooks.append(module.register_forward_hook(
                    lambda _m, _a, out, g=g, prev=prev: self._post_forward(g, prev, out)))
        return hooks

    def _pre_forward(self, g, nxt) -> None:
        self._need(g)
        if nxt is not None and not _in_backward():
            self._start_gather(nxt)                       # prefetch the next layer

    def _post_forward(self, g, prev, out) -> None:
        if _in_backward():                                # a recompute: the backward owns this unit now
            return
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad, g=g, prev=prev: self._pre_backward(g, prev))
        self._reshard(g)

    def _pre_backward(self, g, prev) -> None:
        self._need(g)
        if prev is not None:
            self._start_gather(prev)                      # prefetch the layer whose backward comes next
        return None

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def publish_params(self) -> None:
        """The updated main params become the shards (cast to the param dtype); every unit resharded,
        so the next forward gathers the new weights."""
        for g in self.groups:
            if g.pshard is not g.main:
                g.pshard.copy_(g.main)
            self._reshard(g)
            g.live = 0

    def finish_param_sync(self) -> None:
        """Every unit whole (checkpoints, evaluation, tests): each is resharded again by its next
        forward (layers) or backward (roots), or by the next step."""
        self._need_all(self.groups)

    def _extra_weight_bytes(self) -> int:
        return sum(g.pshard.numel() * g.pshard.element_size() for g in self.groups if g.pshard is not g.main)

    def memory_bytes(self) -> dict:
        out = super().memory_bytes()
        if self.param_dtype == torch.float32:              # the main params are the weights' shards
            out["optimizer"] -= sum(g.main.numel() * 4 for g in self.groups)
            out["weights"] += sum(g.main.numel() * 4 for g in self.groups)
        return out
