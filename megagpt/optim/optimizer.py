"""The optimizer as the training loop sees it: DP gradient sync, mixed precision, clipping, AdamW.

    opt = build_optimizer(chunks, ps, train_cfg, parallel_cfg, model_cfg)
    for step in range(train_iters):
        opt.zero_grad()
        for i, (tokens, labels) in enumerate(microbatches):
            opt.set_sync(i == len(microbatches) - 1)          # reduce over DP on the last one only
            loss = model(tokens, labels).sum() / global_tokens
            opt.scale_loss(loss).backward()
        stats = opt.step(lr_at(step, train_cfg))             # {"grad_norm", "skipped", "loss_scale"}

One step: finish the DP reduction (buckets started from backward hooks) -> complete the TP-partial
gradients (SP norms, replicated KV rows) and sum the tied embedding over the first and last stage
(finalize.py) -> unscale and check for inf/NaN (fp16) -> global grad norm and clipping -> AdamW on the fp32
main params this rank owns -> the updated weights back into the model (all-gather over DP).

With parallel.overlap_param_gather (the distributed optimizer, dp > 1) step() only launches the
all-gathers, one per bucket, first layers first; each module's forward pre-hook waits on its own
buckets, so the gathers overlap the next forward. Anything else that reads the weights first
calls `finish_param_sync()`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import ModelConfig, ParallelConfig, TrainConfig, dp_mode
from ..model.compile import COMPILED_UNIT
from ..parallel.layers import meta_of
from ..parallel.state import ParallelState
from .adamw import PlainAdamW, ShardedAdamW
from .clip import clip_, counted_ranges, global_norm, intersect
from .finalize import finalize_grads
from .grad_buffer import GradBuffer
from .scaler import LossScaler, ScaledLoss

__all__ = ["DTYPES", "Optimizer", "build_optimizer"]

from ..config import DTYPES  # noqa: E402  (re-exported: one table, in config)
SCALAR_KEYS = ("step", "loss_scale", "growth_tracker")   # the non-parameter keys of a checkpoint state


class Optimizer(ScaledLoss):
    def __init__(self, chunks: list[nn.Module], ps: ParallelState, train_cfg: TrainConfig,
                 parallel_cfg: ParallelConfig, model_cfg: ModelConfig | None = None):
        """model_cfg: unused (what the optimizer needs of the model is in each parameter's ParamMeta)."""
        self.chunks, self.ps, self.cfg = list(chunks), ps, train_cfg
        self.distributed = dp_mode(train_cfg, parallel_cfg) != "ddp"
        named = [[(n, p) for n, p in c.named_parameters() if p.requires_grad] for c in self.chunks]
        want = DTYPES[train_cfg.dtype]
        wrong = [(n, p.dtype) for c in named for n, p in c if p.dtype != want]
        if wrong:
            raise ValueError(f"build_optimizer: train.dtype={train_cfg.dtype} but {wrong[0][0]} is "
                             f"{wrong[0][1]}; build the model with dtype={want}")
        self.names = names = {id(p): n for c in named for n, p in c}
        # a tied parameter's copies on other stages must have the same shards: each sits alone
        tied_params = [p for c in named for _, p in c if meta_of(p).tied and ps.embedding.size > 1]
        # parameters are replicated over DP and CP: gradients are reduced (and ZeRO shards owned) over dp x cp
        self.buffer = GradBuffer([[p for _, p in c] for c in named], ps.dp_cp,
                                 int(parallel_cfg.bucket_size_mb * 2 ** 20), self.distributed,
                                 own_bucket=tied_params, device=ps.device, expert_dp=ps.edp,
                                 fuse_wgrad=train_cfg.grad_accum_fusion)
        rule = ShardedAdamW if self.distributed else PlainAdamW
        self.update = rule(names, self.buffer, ps.dp_cp, train_cfg)
        self.scaler = LossScaler(train_cfg.dtype == "fp16", train_cfg.initial_loss_scale,
                                 train_cfg.loss_scale_window, train_cfg.min_loss_scale)
        self.world = ps.world
        # plain AdamW: every DP rank holds its whole buckets, so one replica's sum (mp) is the norm; with
        # experts (which differ over ep) the world sums the buckets of each group's rank 0 instead
        experts = any(b.group is not ps.dp_cp for b in self.buffer.buckets)   # dense buckets reduce over dp x cp
        self.norm_group = self.world if self.distributed or experts else ps.mp
        self.owned = self.buffer.owned_views()
        self.norm_views = self._norm_views()
        self.steps = 0                          # updates applied (skipped steps do not count)
        self.overlap = parallel_cfg.overlap_param_gather and self.distributed and ps.dp_cp.size > 1
        self._hooks = self._register_gather_waits() if self.overlap else []

    def _register_gather_waits(self) -> list:
        """A forward pre-hook on every module that owns parameters: before it first runs after a
        step, finish the all-gathers of its buckets and of every bucket launched before them (in
        launch order; collectives on one group complete in that order anyway). So each chunk's first
        module waits on its own buckets, and a parameter read by a later module of its chunk (the
        tied LM head on the last stage) is in by then. A compiled block (train.compile) is one unit: its
        hook waits on all of its buckets, and nothing inside the compiled graph waits."""
        hooks, bucket_of = [], self.buffer.bucket_of
        for chunk in self.chunks:
            units = [m for m in chunk.modules() if getattr(m, COMPILED_UNIT, False)]
            inside = {id(sub) for u in units for sub in u.modules() if sub is not u}
            for module in chunk.modules():
                if id(module) in inside:
                    continue
                unit = getattr(module, COMPILED_UNIT, False)
                mine = [bucket_of[id(p)].index for p in module.parameters(recurse=unit) if id(p) in bucket_of]
                if mine:
                    first = min(mine)
                    hooks.append(module.register_forward_pre_hook(
                        lambda _m, _args, first=first: self.update.wait_from(first) if self.update.pending else None))
        return hooks

    def _norm_views(self) -> list[torch.Tensor]:
        """The pieces of the buffer this rank counts in the global norm (see clip.py). Without the
        distributed optimizer every CP rank holds the whole (reduced) gradient: CP rank 0 counts it."""
        views = []
        if not self.distributed and self.ps.cp.rank > 0:
            return views
        for b in self.buffer.buckets:
            if not self.distributed and self.norm_group is self.world and b.group.rank != 0:
                continue
            lo, hi = self.buffer.owned_range(b)
            for p in b.params:
                start, _ = self.buffer.param_range[id(p)]
                ranges = counted_ranges(p, self.ps.tp)
                for a, z in intersect(ranges, lo - start, hi - start):
                    views.append(self.buffer.data[start + a:start + z])
        return views

    # ------------------------------------------------------------------ the loop's calls
    def zero_grad(self) -> None:
        self.buffer.zero(skip=set(self.update.pending))

    def finish_param_sync(self) -> None:
        """Finish the parameter all-gathers still in flight from the last step. Whatever reads the
        weights outside a forward (evaluation, checkpoints, tests, the end of training) calls this."""
        self.update.wait_from(0)

    def set_sync(self, flag: bool) -> None:
        self.buffer.set_sync(flag)

    def no_sync(self):
        return self.buffer.no_sync()

    def step(self, lr: float) -> dict:
        if self.update.pending:     # their bytes took gradients: some param was read outside its module
            names = [self.names[id(p)] for i in sorted(self.update.pending)
                     for p in self.buffer.buckets[i].params]
            raise RuntimeError(f"parallel.overlap_param_gather: no forward pre-hook waited on the weights of "
                               f"{names[:3]}; read them through their module's forward, or set it to false")
        self.buffer.finish_grad_sync()
        finalize_grads(self.chunks, self.ps)
        if self.scaler.dynamic:
            self.scaler.unscale_(self.owned)
            found_inf = self.scaler.found_inf(self.owned, self.world, self.buffer.data.device)
            self.scaler.update(found_inf)
            if found_inf:
                return {"grad_norm": float("inf"), "skipped": True, "loss_scale": self.scaler.scale}
        norm = global_norm(self.norm_views, self.norm_group, self.buffer.data.device)
        clip_(self.owned, self.cfg.clip_grad, norm)
        self.steps += 1
        self.update.step(lr, self.steps)
        self.update.start_param_gather()        # waited on by the next forward's pre-hooks
        if not self.overlap:
            self.finish_param_sync()
        return {"grad_norm": norm, "skipped": False, "loss_scale": self.scaler.scale}

    # ------------------------------------------------------------------ checkpoints and accounting
    def state_for_checkpoint(self, copy: bool = True) -> dict:
        """{param name: {"start", "end", "main", "exp_avg", "exp_avg_sq"}} for the flat range of each
        param's local (TP-sharded) tensor that this rank owns, plus "step", "loss_scale", "growth_tracker".
        copy=False: views of the live state (a save streams them to disk without a 12-byte/param copy)."""
        state = self.update.state_for_checkpoint(copy)
        state.update(step=self.steps, **self.scaler.state_dict())
        return state

    def owned_ranges(self) -> dict[str, tuple[int, int]]:
        """{param name: (start, end)}: the flat range of each param's local tensor that this rank's state
        covers (what state_for_checkpoint would hold), without copying any state."""
        return self.update.owned_ranges()

    def load_from_checkpoint(self, state: dict) -> None:
        """The inverse of state_for_checkpoint, for this rank's ranges; also sets the model's weights.
        `state` may be any mapping (a load reads each tensor when it is asked for, and copies it in place)."""
        self.steps = int(state["step"])
        self.scaler.load_state_dict(state)
        self.update.load_from_checkpoint({k: v for k, v in state.items() if k not in SCALAR_KEYS}, self.steps)

    def memory_bytes(self) -> dict:
        """Bytes this rank holds, measured from the tensors: model weights, grad buffer, optimizer state."""
        weights = sum(p.numel() * p.element_size() for c in self.chunks for p in c.parameters())
        return {"weights": weights, "grads": self.buffer.data.numel() * self.buffer.data.element_size(),
                "optimizer": self.update.state_bytes()}


def build_optimizer(chunks: list[nn.Module], ps: ParallelState, train_cfg: TrainConfig,
                    parallel_cfg: ParallelConfig, model_cfg: ModelConfig) -> Optimizer:
    """train.dp_mode picks the class: ddp and zero1 this one, zero2 zero.py's, zero3 zero3.py's."""
    mode = dp_mode(train_cfg, parallel_cfg)
    if mode == "zero2":
        from .zero import ShardedOptimizer
        return ShardedOptimizer(chunks, ps, train_cfg, parallel_cfg)
    if mode == "zero3":
        from .zero3 import Zero3Optimizer
        return Zero3Optimizer(chunks, ps, train_cfg, parallel_cfg)
    return Optimizer(chunks, ps, train_cfg, parallel_cfg, model_cfg)
