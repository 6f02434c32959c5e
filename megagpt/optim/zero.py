"""ZeRO-2: gradients, and the optimizer state, sharded over DP (ZeRO-3, zero3.py, adds the parameters).

The trainable parameters of each model chunk are cut into flat groups, each padded to a multiple of
the DP size d: the grad buffer's buckets (plan_buckets) for zero2, one group per layer and two root
groups per chunk for zero3 (zero3.py). DP rank r owns the slice [r*S, (r+1)*S) of every group (S = padded size / d) and keeps,
for that slice only, in fp32: the reduced gradient, the main params and the two Adam moments.

Gradients. Every parameter has a post-accumulate-grad hook: its gradient (model dtype) is added into
its group's fp32 flat [size] (allocated on the group's first arrival, so one group or two exist at a
time) and p.grad is freed. When the group is complete, its TP-partial gradients are finished in place
(finalize_tp_grads: SP norms, replicated KV rows; TP peers hold the same groups) and a reduce-scatter
over DP starts, asynchronously, in place; when the next group starts its own, the previous one is
waited on, added into the owned fp32 shard, and its flat freed (the last one of a backward by the
next forward's pre-hook, or by step()). So the unowned gradients live only while a group fills. This happens on every microbatch (a full-size accumulator is what zero2 saves),
so with m microbatches a step reduce-scatters m times; set_sync() is accepted and ignored.

The step: finish the reductions -> the tied embedding's shard summed over its stages (it sits alone in
its group on both, so the shards line up) -> unscale / inf check (fp16) -> the global norm over the
world, each element counted once (clip.py's counted ranges, intersected with the owned slice) ->
clipping -> AdamW on the owned slices (adamw.ShardedAdamW's update, on `Segment`s) -> the updated
weights back: zero2 all-gathers each group's shard in the param dtype into the (whole) parameters.

Bytes per parameter and rank: weights e (2 in bf16, 4 in fp32) + fp32 grads 4/d + Adam 8/d + fp32
main 4/d, which in fp32 is the weights' own owned slice: bf16 2 + 16/d, fp32 4 + 12/d. (ZeRO's paper
counts 2 + 14/d: its gradient shard is fp16; here gradients are accumulated and reduced in fp32.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..config import DTYPES, TrainConfig
from ..parallel.layers import meta_of
from ..parallel.state import ParallelState
from .adamw import Segment, ShardedAdamW
from .clip import clip_, counted_ranges, global_norm, intersect
from .finalize import finalize_tp_grads
from .grad_buffer import plan_buckets
from .scaler import LossScaler, ScaledLoss

SCALAR_KEYS = ("step", "loss_scale", "growth_tracker")


@dataclass(eq=False)
class FlatGroup:
    """One bucket (zero2) or unit (zero3): params laid out flat, padded to a multiple of dp."""
    index: int
    params: list
    ranges: dict                       # id(p) -> [start, end) in the flat
    size: int                          # padded numel
    lo: int                            # owned slice [lo, hi) of the flat
    hi: int
    grad: torch.Tensor | None = None   # fp32 [hi - lo]: the reduced gradient, accumulated over microbatches
    flat: torch.Tensor | None = None   # fp32 [size] while this microbatch's gradients arrive
    arrived: set = field(default_factory=set)
    handle: object = None
    segments: list = field(default_factory=list)


def make_groups(param_lists: list[list[nn.Parameter]], dp) -> list[FlatGroup]:
    groups = []
    for params in param_lists:
        ranges, at = {}, 0
        for p in params:
            ranges[id(p)] = (at, at + p.numel())
            at += p.numel()
        size = -(-at // dp.size) * dp.size
        n = size // dp.size
        groups.append(FlatGroup(len(groups), params, ranges, size, dp.rank * n, (dp.rank + 1) * n))
    return groups


class ShardedOptimizer(ScaledLoss):
    """zero2 (this class) and zero3 (Zero3Optimizer): the interface of optimizer.Optimizer."""
    shard_params = False               # zero3: the weights themselves are sharded

    def __init__(self, chunks: list[nn.Module], ps: ParallelState, train_cfg: TrainConfig, parallel_cfg,
                 param_lists: list[list[nn.Parameter]] | None = None):
        self.chunks, self.ps, self.cfg, self.dp = list(chunks), ps, train_cfg, ps.dp_cp   # params replicated over CP
        named = [(n, p) for c in self.chunks for n, p in c.named_parameters() if p.requires_grad]
        want = DTYPES[train_cfg.dtype]
        wrong = [(n, p.dtype) for n, p in named if p.dtype != want]
        if wrong:
            raise ValueError(f"build_optimizer: train.dtype={train_cfg.dtype} but {wrong[0][0]} is "
                             f"{wrong[0][1]}; build the model with dtype={want}")
        self.param_dtype, self.names = want, {id(p): n for n, p in named}
        if param_lists is None:
            param_lists = self._buckets(parallel_cfg)
        self.groups = make_groups(param_lists, self.dp)
        self.group_of = {id(p): g for g in self.groups for p in g.params}
        device = ps.device
        for g in self.groups:
            g.grad = torch.zeros(g.hi - g.lo, device=device)
        self._init_state(device)
        self.scaler = LossScaler(train_cfg.dtype == "fp16", train_cfg.initial_loss_scale,
                                 train_cfg.loss_scale_window, train_cfg.min_loss_scale)
        self.segments = [s for g in self.groups for s in g.segments]
        self.grads = [g.grad[s.buf_lo - g.lo:s.buf_lo - g.lo + s.hi - s.lo] for g in self.groups for s in g.segments]
        self.owned = [g.grad for g in self.groups]
        self.norm_views = self._norm_views()
        self.tied = [g for g in self.groups if any(meta_of(p).tied for p in g.params)]
        self.steps = 0
        self.in_flight: list[FlatGroup] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for g in self.groups for p in g.params]
        # the last reduction of a backward is finished by the next forward: its flat is not held through it
        self._hooks += [c.register_forward_pre_hook(lambda *_: self._drain()) for c in self.chunks]

    def _buckets(self, parallel_cfg) -> list[list[nn.Parameter]]:
        """zero2's groups: the grad buffer's bucket plan (a tied embedding alone, as for zero1)."""
        chunk_params = [[p for p in c.parameters() if p.requires_grad] for c in self.chunks]
        alone = [{i for i, p in enumerate(ps_) if meta_of(p).tied and self.ps.embedding.size > 1}
                 for ps_ in chunk_params]
        elems = max(1, int(parallel_cfg.bucket_size_mb * 2 ** 20) // 4)
        plan = plan_buckets([[p.numel() for p in c] for c in chunk_params], elems, 1, alone)
        return [[chunk_params[c][i] for i in indices] for c, indices, _, _ in plan]

    # ------------------------------------------------------------------ state
    def _owned_param_views(self, g: FlatGroup):
        """(p, a, z): the owned piece [a, z) of each param of g, in the param's flat coordinates."""
        for p in g.params:
            s, e = g.ranges[id(p)]
            a, z = max(s, g.lo), min(e, g.hi)
            if a < z:
                yield p, a - s, z - s, a

    @torch.no_grad()
    def _init_state(self, device) -> None:
        """Main params and moments for the owned slices. fp32 zero2: the main params are views into the
        weights (no copy); otherwise one fp32 flat per group (zero3 fp32: also the weights' shard)."""
        for g in self.groups:
            n = g.hi - g.lo
            g.main = None if (self.param_dtype == torch.float32 and not self.shard_params) else \
                torch.zeros(n, device=device)
            g.exp_avg, g.exp_avg_sq = torch.zeros(n, device=device), torch.zeros(n, device=device)
            for p, a, z, at in self._owned_param_views(g):
                seg = Segment(self.names[id(p)], p, a, z, at)
                k = at - g.lo
                flat = p.detach().view(-1)[a:z]
                if g.main is None:
                    seg.main = flat
                else:
                    seg.main = g.main[k:k + z - a]
                    seg.main.copy_(flat)
                seg.exp_avg, seg.exp_avg_sq = g.exp_avg[k:k + z - a], g.exp_avg_sq[k:k + z - a]
                g.segments.append(seg)

    def _norm_views(self) -> list[torch.Tensor]:
        views = []
        for g in self.groups:
            for p, a, z, at in self._owned_param_views(g):
                for x, y in intersect(counted_ranges(p, self.ps.tp), a, z):
                    k = at - g.lo + x - a
                    views.append(g.grad[k:k + y - x])
        return views

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def _on_grad(self, p: nn.Parameter) -> None:
        g = self.group_of[id(p)]
        if g.handle is not None or g in self.in_flight:     # its last microbatch's reduction: finish it first
            self._drain()
        if g.flat is None:
            g.flat = torch.zeros(g.size, device=g.grad.device)       # [size] fp32
        s, e = g.ranges[id(p)]
        g.flat[s:e].add_(p.grad.reshape(-1))
        p.grad = None
        g.arrived.add(id(p))
        if len(g.arrived) == len(g.params):
            self._launch(g)

    def _launch(self, g: FlatGroup) -> None:
        """Finish the TP-partial gradients of the group, then start its in-place DP reduce-scatter."""
        views = {id(p): g.flat[slice(*g.ranges[id(p)])].view(p.shape) for p in g.params}
        finalize_tp_grads(g.params, self.ps.tp, lambda p: views[id(p)])
        self._drain()                                   # at most one reduction in flight
        g.handle = self.dp.reduce_scatter_async(g.flat[g.lo:g.hi], g.flat)
        self.in_flight.append(g)
        g.arrived = set()
        self._group_done(g)

    def _group_done(self, g: FlatGroup) -> None:
        """zero3: reshard the group's weights once its backward is over."""

    def _drain(self) -> None:
        while self.in_flight:
            g = self.in_flight.pop(0)
            if g.handle is not None:
                g.handle.wait()
            g.grad.add_(g.flat[g.lo:g.hi])
            g.handle, g.flat = None, None

    def finish_grad_sync(self) -> None:
        """Reduce what is left (groups some of whose params got no gradient), in group order."""
        for g in self.groups:
            if g.flat is not None and g not in self.in_flight:
                self._launch(g)
        self._drain()

    # ------------------------------------------------------------------ the loop's calls
    def zero_grad(self) -> None:
        self._drain()
        for g in self.groups:
            g.grad.zero_()

    def set_sync(self, flag: bool) -> None:
        """Every microbatch reduces (see the module docstring)."""

    def no_sync(self):
        import contextlib
        return contextlib.nullcontext()

    def step(self, lr: float) -> dict:
        self.finish_grad_sync()
        if self.ps.embedding.size > 1:
            for g in self.tied:
                self.ps.embedding.all_reduce(g.grad)
        if self.scaler.unscale_and_check(self.owned, self.ps.world, self.ps.device):
            return {"grad_norm": float("inf"), "skipped": True, "loss_scale": self.scaler.scale}
        norm = global_norm(self.norm_views, self.ps.world, self.ps.device)
        clip_(self.owned, self.cfg.clip_grad, norm)
        self.steps += 1
        ShardedAdamW.step(self, lr, self.steps)          # the same update rule as zero1, on these segments
        self.publish_params()
        return {"grad_norm": norm, "skipped": False, "loss_scale": self.scaler.scale}

    @torch.no_grad()
    def publish_params(self) -> None:
        """zero2: every group's updated shard, cast to the param dtype, all-gathered into the weights."""
        for g in self.groups:
            full = torch.empty(g.size, dtype=self.param_dtype, device=g.grad.device)
            mine = full[g.lo:g.hi]
            for s in g.segments:
                mine[s.buf_lo - g.lo:s.buf_lo - g.lo + s.hi - s.lo].copy_(s.main)
            handle = self.dp.all_gather_async(full, mine)
            if handle is not None:
                handle.wait()
            for p in g.params:
                p.detach().view(-1).copy_(full[slice(*g.ranges[id(p)])])

    def finish_param_sync(self) -> None:
        """The weights are whole after every step (zero3 overrides)."""

    # ------------------------------------------------------------------ checkpoints and accounting
    def owned_ranges(self) -> dict[str, tuple[int, int]]:
        return {s.name: (s.lo, s.hi) for s in self.segments}

    def state_for_checkpoint(self, copy: bool = True) -> dict:
        state = ShardedAdamW.state_for_checkpoint(self, copy)       # the same entries as zero1's
        state.update(step=self.steps, **self.scaler.state_dict())
        return state

    def load_from_checkpoint(self, state: dict) -> None:
        self.steps = int(state["step"])
        self.scaler.load_state_dict(state)
        ShardedAdamW.load_from_checkpoint(self, {k: v for k, v in state.items() if k not in SCALAR_KEYS}, self.steps)

    def gather_params(self) -> None:                     # ShardedAdamW.load_from_checkpoint's last call
        self.publish_params()

    def padding(self) -> int:
        return sum(g.size - sum(p.numel() for p in g.params) for g in self.groups)

    def memory_bytes(self) -> dict:
        """Bytes this rank holds, from the tensors (the weights' live storage, so zero3's shards)."""
        storages = {}
        for c in self.chunks:
            for p in c.parameters():
                st = p.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        mains = sum(g.main.numel() * 4 for g in self.groups if g.main is not None)
        return {"weights": sum(storages.values()) + self._extra_weight_bytes(),
                "grads": sum(g.grad.numel() * 4 for g in self.groups),
                "optimizer": mains + sum(g.exp_avg.numel() * 8 for g in self.groups)}

    def _extra_weight_bytes(self) -> int:
        return 0
