"""The two update rules over the gradient buffer: ZeRO-1 AdamW (sharded over DP) and plain AdamW.

ShardedAdamW (the distributed optimizer). DP rank r owns shard r of every bucket (see
grad_buffer.py; a bucket of expert weights is sharded over its edp group instead). It keeps fp32 main params and the Adam moments for the owned elements only,
12 bytes per owned element, so 12*Psi/d per rank. The owned piece of each parameter is one
contiguous range of its flattened local tensor: a `Segment`. The step runs AdamW on the segments
through torch.optim.AdamW(fused=True)'s kernel (decoupled decay p -= lr*wd*p first, then the
bias-corrected Adam update, one pass over memory), then every bucket's updated shard is
all-gathered in the model's dtype into every rank's parameters.
With fp32 weights the main params are views into the model params themselves (no extra copy:
8 bytes per owned element); with bf16/fp16 weights they are a separate fp32 flat tensor.
At DP = 1 with fp32 weights the update has already landed in the parameters (the main params are
their views, and this rank owns everything): there is nothing to gather, so no shard is copied into
the buffer and back (the spent gradients stay there until the next zero_grad zeroes the buffer).

PlainAdamW (for comparison, and the `distributed_optimizer: false` path): torch.optim.AdamW on
fp32 main params (the model params themselves in fp32), every DP rank holding everything.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import TrainConfig
from ..parallel.state import Group
from .grad_buffer import GradBuffer


def decays(p: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: not to norm weights nor to biases."""
    return p.ndim >= 2


@dataclass
class Segment:
    """The owned piece of one parameter: flat [lo, hi) of its local tensor, at buf_lo in the buffer."""
    name: str
    param: nn.Parameter
    lo: int
    hi: int
    buf_lo: int
    main: torch.Tensor | None = None       # fp32 [hi - lo]
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None


class ShardedAdamW:
    def __init__(self, names: dict[int, str], buffer: GradBuffer, dp: Group, cfg: TrainConfig):
        self.buffer, self.dp, self.cfg = buffer, dp, cfg
        self.segments: list[Segment] = []
        self.by_bucket: list[list[Segment]] = []
        for b in buffer.buckets:
            lo, hi = buffer.owned_range(b)
            mine = []
            for p in b.params:
                ps, pe = buffer.param_range[id(p)]
                a, z = max(ps, lo), min(pe, hi)
                if a < z:
                    mine.append(Segment(names[id(p)], p, a - ps, z - ps, a))
            self.by_bucket.append(mine)
            self.segments += mine
        n = sum(s.hi - s.lo for s in self.segments)
        dtypes = {p.dtype for b in buffer.buckets for p in b.params}
        if len(dtypes) > 1:
            raise ValueError(f"distributed optimizer: the model mixes param dtypes {sorted(map(str, dtypes))}")
        self.param_dtype = dtypes.pop() if dtypes else torch.float32
        device = buffer.data.device
        self.main_flat = None if self.param_dtype == torch.float32 else torch.empty(n, device=device)
        self.exp_avg = torch.zeros(n, device=device)
        self.exp_avg_sq = torch.zeros(n, device=device)
        off = 0
        with torch.no_grad():
            for s in self.segments:
                k = s.hi - s.lo
                flat = s.param.detach().view(-1)[s.lo:s.hi]
                if self.main_flat is None:
                    s.main = flat                                   # fp32: update the model param in place
                else:
                    s.main = self.main_flat[off:off + k]
                    s.main.copy_(flat)
                s.exp_avg, s.exp_avg_sq = self.exp_avg[off:off + k], self.exp_avg_sq[off:off + k]
                off += k
        self.grads = [buffer.data[s.buf_lo:s.buf_lo + s.hi - s.lo] for s in self.segments]
        self.pending: dict[int, object] = {}     # bucket index -> all-gather handle, not yet copied out

    @torch.no_grad()
    def step(self, lr: float, step: int) -> None:
        """One AdamW update of the owned segments; `step` counts from 1 (bias correction). One fused
        kernel pass per group (torch.optim.AdamW(fused=True)'s kernel, CPU and CUDA) instead of eight
        foreach passes: moments bit-identical, weights within an ulp or two."""
        cfg = self.cfg
        if not self.segments:
            return
        count = torch.tensor(float(step), device=self.segments[0].main.device)
        for decayed, wd in ((True, cfg.weight_decay), (False, 0.0)):
            segs = [(s, g) for s, g in zip(self.segments, self.grads) if decays(s.param) == decayed]
            if segs:
                torch._fused_adamw_([s.main for s, _ in segs], [g for _, g in segs], [s.exp_avg for s, _ in segs],
                                    [s.exp_avg_sq for s, _ in segs], [], [count] * len(segs), lr=lr,
                                    beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, weight_decay=wd, eps=cfg.adam_eps,
                                    amsgrad=False, maximize=False)

    # ------------------------------------------------------------------ the updated weights back to every rank
    def _bucket_bytes(self, b) -> torch.Tensor:
        """Bucket b's own bytes in the grad buffer, read as the model dtype: [end - start] elements
        (the first half of the bucket's fp32 bytes for bf16/fp16). Its gradients are spent once
        the update has run, so the all-gather lands there and needs no memory of its own."""
        flat = self.buffer.data if self.param_dtype == self.buffer.data.dtype else \
            self.buffer.data.view(torch.uint8).view(self.param_dtype)
        ratio = self.buffer.data.element_size() // flat.element_size()
        return flat[b.start * ratio:b.start * ratio + b.end - b.start]

    @torch.no_grad()
    def start_param_gather(self) -> None:
        """Launch one async all-gather per bucket of its owned shard, cast to the model dtype, in the
        order the next forward needs them: the last bucket (the first layers) first."""
        self.wait_from(0)                      # never two gathers into one bucket's bytes
        if self.dp.size == 1 and self.main_flat is None:
            return                             # the update wrote the params themselves
        for b, segs in reversed(list(zip(self.buffer.buckets, self.by_bucket))):
            region = self._bucket_bytes(b)                                   # [end - start]
            lo, hi = (x - b.start for x in self.buffer.owned_range(b))
            for s in segs:
                region[s.buf_lo - b.start:s.buf_lo - b.start + s.hi - s.lo].copy_(s.main)
            self.pending[b.index] = b.group.all_gather_async(region, region[lo:hi])   # in place

    @torch.no_grad()
    def wait_from(self, first: int) -> None:
        """Finish the pending gathers of buckets first.. (those launched no later than bucket
        `first`), in launch order: copy each into its params, then zero its bytes for the gradients."""
        for index in sorted((i for i in self.pending if i >= first), reverse=True):
            handle, b = self.pending.pop(index), self.buffer.buckets[index]
            if handle is not None:
                handle.wait()
            region = self._bucket_bytes(b)
            for p in b.params:
                ps, pe = self.buffer.param_range[id(p)]
                p.detach().view(-1).copy_(region[ps - b.start:pe - b.start])
            self.buffer.data[b.start:b.end].zero_()

    def gather_params(self) -> None:
        """The synchronous form: launch every bucket's gather and finish them all."""
        self.start_param_gather()
        self.wait_from(0)

    def owned_ranges(self) -> dict[str, tuple[int, int]]:
        return {s.name: (s.lo, s.hi) for s in self.segments}

    def state_for_checkpoint(self, copy: bool = True) -> dict:
        keep = torch.clone if copy else (lambda t: t)
        return {s.name: {"start": s.lo, "end": s.hi, "main": keep(s.main.detach().float()),
                         "exp_avg": keep(s.exp_avg), "exp_avg_sq": keep(s.exp_avg_sq)}
                for s in self.segments}

    @torch.no_grad()
    def load_from_checkpoint(self, state: dict, step: int) -> None:
        for s in self.segments:
            entry = _entry_for(state, s.name, s.lo, s.hi)
            s.main.copy_(entry["main"])
            s.exp_avg.copy_(entry["exp_avg"])
            s.exp_avg_sq.copy_(entry["exp_avg_sq"])
        self.gather_params()

    def state_bytes(self) -> int:
        main = self.main_flat.numel() * 4 if self.main_flat is not None else 0
        return main + (self.exp_avg.numel() + self.exp_avg_sq.numel()) * 4


class PlainAdamW:
    def __init__(self, names: dict[int, str], buffer: GradBuffer, dp: Group, cfg: TrainConfig):
        self.buffer, self.cfg = buffer, cfg
        self.params = [p for b in buffer.buckets for p in b.params]
        self.names = [names[id(p)] for p in self.params]
        # fp32 weights are their own main params; bf16/fp16 weights get an fp32 copy
        self.mains = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        groups = [{"params": [m for m, p in zip(self.mains, self.params) if decays(p)],
                   "weight_decay": cfg.weight_decay},
                  {"params": [m for m, p in zip(self.mains, self.params) if not decays(p)],
                   "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        fused = buffer.data.device.type in ("cuda", "cpu")     # one kernel pass instead of foreach passes
        # None: nothing trainable here (a frozen stage under train.freeze_lm)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     eps=cfg.adam_eps, fused=fused or None) if groups else None

    def step(self, lr: float, step: int) -> None:
        if self.opt is None:
            return
        for g in self.opt.param_groups:
            g["lr"] = lr
        for m, p in zip(self.mains, self.params):
            m.grad = p.main_grad               # a view of the (all-reduced) buffer: no copy
        self.opt.step()
        for m in self.mains:
            m.grad = None                      # else the next backward would accumulate into the buffer view

    @torch.no_grad()
    def gather_params(self) -> None:
        for m, p in zip(self.mains, self.params):
            if m is not p:
                p.copy_(m)

    start_param_gather = gather_params          # every rank holds everything: nothing to overlap
    pending: dict = {}

    def wait_from(self, first: int) -> None:
        pass

    def owned_ranges(self) -> dict[str, tuple[int, int]]:
        return {name: (0, m.numel()) for name, m in zip(self.names, self.mains)}

    def state_for_checkpoint(self, copy: bool = True) -> dict:
        keep = torch.clone if copy else (lambda t: t)
        out = {}
        for name, m in zip(self.names, self.mains):
            st = self.opt.state.get(m, {})
            zeros = torch.zeros(m.numel(), device=m.device)
            out[name] = {"start": 0, "end": m.numel(), "main": keep(m.detach().float().reshape(-1)),
                         "exp_avg": keep(st["exp_avg"].reshape(-1)) if st else zeros,
                         "exp_avg_sq": keep(st["exp_avg_sq"].reshape(-1)) if st else zeros.clone()}
        return out

    @torch.no_grad()
    def load_from_checkpoint(self, state: dict, step: int) -> None:
        for name, m in zip(self.names, self.mains):
            entry = _entry_for(state, name, 0, m.numel())
            m.copy_(entry["main"].view_as(m))
            # fused AdamW wants its step counters on the parameter's device
            step_t = torch.tensor(float(step), device=m.device)
            self.opt.state[m] = {"step": step_t,
                                 "exp_avg": entry["exp_avg"].to(m.device).view_as(m).clone(),
                                 "exp_avg_sq": entry["exp_avg_sq"].to(m.device).view_as(m).clone()}
        self.gather_params()

    def state_bytes(self) -> int:
        copies = sum(m.numel() * 4 for m, p in zip(self.mains, self.params) if m is not p)
        moments = sum(t.numel() * t.element_size() for st in (self.opt.state.values() if self.opt else ())
                      for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
        return copies + moments


def _entry_for(state: dict, name: str, lo: int, hi: int) -> dict:
    if name not in state:
        raise KeyError(f"optimizer checkpoint: no entry for parameter {name!r}")
    entry = state[name]
    if (entry["start"], entry["end"]) != (lo, hi):
        raise ValueError(f"optimizer checkpoint: {name} holds flat range [{entry['start']}, {entry['end']}) "
                         f"but this rank owns [{lo}, {hi}); reshard it first")
    return entry
