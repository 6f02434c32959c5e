"""The pipeline executor: runs this rank's op list from `schedule.build_schedule` over its model chunks.

The schedule is data, so the executor is one loop over it: F runs a chunk's forward, B its
backward, and each run of consecutive comm ops is posted as one non-blocking p2p batch. A
receive is waited on only right before the F or B that consumes it, and sends only once they
are done (or at the end), so a rank never idles for a tensor it does not need yet; this is the
behaviour `simulate.simulate` models, and `check_no_deadlock` proves it terminates.
Every buffer is keyed by (microbatch, local chunk), as the ops are:
  _recv_act   RECV_F -> F     (buffer, works) of the chunk's input activation [s/tp, b, h]
  _send_act   F -> SEND_F     the chunk's output activation                    [s/tp, b, h]
  _stash      F -> B          (input, output) kept for backward (this is the activation memory)
  _recv_grad  RECV_B -> B     (buffer, works) of the gradient of the chunk's output
  _send_grad  B -> SEND_B     the gradient of the chunk's input
  _sending                    (tensor, works) of posted sends, kept alive until they complete
Each entry is popped by its consumer, so what is held at any time is what the schedule has in
flight: the measured activation memory follows `simulate.simulate`'s peak_inflight.

Timing: `timeline` holds (op, start, end, waited) per compute op of the last call
(time.perf_counter seconds; waited is the part of [start, end] spent waiting for its input),
so a bubble is measured on the engine itself (tools/schedule.py --measure, make bench).
`timer`, if set, is called as `with timer("compute"):` around each F/B and
`with timer("comm_wait"):` around each p2p wait: the benchmark's hook (bench/scaling.py StepClock).

Loss: the last global chunk turns its per-token losses [b, s] into sum * loss_scale and
backpropagates that. The caller passes loss_scale = 1 / (tokens in the global batch over all
DP ranks), so gradients summed over microbatches (they accumulate in .grad) and over DP are
exactly the one-process gradients of the mean per-token loss. The MoE layers' auxiliary losses
(model/moe.py) enter with weight loss_scale * tokens per microbatch: their mean over microbatches.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from ..config import Config, ConfigError
from ..layout import Layout
from ..model.gpt import GPTModel
from ..parallel.state import ParallelState
from .p2p import P2P
from .schedule import Op, build_schedule, comm_batches, post_receives_early


def forward_only_schedule(pp: int, vp: int, m: int, early_recv: bool = False) -> list[list[Op]]:
    """Every rank's ops for evaluation: the training schedule's F, SEND_F and RECV_F, in order.

    GPipe's forward half for vp == 1 (it starts each forward as early as possible), interleaved
    1F1B's for vp > 1 (the chunk order that keeps the ring busy). Dropping the backward ops only
    removes waits, and tests check every such filtered schedule with `check_no_deadlock`. Receives are
    moved early after the backward ops are dropped: moved before, many would sit right before their
    consumer once the B between them is gone, and gloo only starts a transfer once it is posted."""
    base = build_schedule("gpipe" if vp == 1 else "interleaved", pp, vp, m)
    forward = [[op for op in ops if op.kind in ("F", "SEND_F", "RECV_F")] for ops in base]
    return [post_receives_early(ops) for ops in forward] if early_recv else forward


class PipelineEngine:
    """Runs forward and backward of num_microbatches over this rank's chunks (local chunk order).

    tensor_shape/dtype: what crosses a stage boundary (`p2p.activation_shape(cfg)`, the
    activation dtype). schedule_kind: gpipe, 1f1b or interleaved (None: cfg.train.schedule;
    1f1b with vp > 1 is interleaved). wait_p2p: "deferred" waits on a receive just before its
    consumer; "batch" waits on each batch as soon as it is posted (the old executor, kept to
    measure what deferring buys: `simulate(p2p="blocking")` models it)."""

    def __init__(self, chunks: list[GPTModel], ps: ParallelState, cfg: Config, tensor_shape: tuple,
                 dtype: torch.dtype, schedule_kind: str | None = None, wait_p2p: str = "deferred"):
        if wait_p2p not in ("deferred", "batch"):
            raise ValueError(f"wait_p2p must be 'deferred' or 'batch', got {wait_p2p!r}")
        self.wait_p2p = wait_p2p
        self.kind = schedule_kind or cfg.train.schedule
        self.layout = Layout.from_config(cfg, schedule=self.kind)
        if ps.pp.size != cfg.parallel.pp:
            raise ConfigError(f"parallel.pp: the config says {cfg.parallel.pp}, the process groups have {ps.pp.size}")
        if len(chunks) != cfg.parallel.vp:
            raise ConfigError(f"parallel.vp: the config says {cfg.parallel.vp} chunks per rank, got {len(chunks)} chunks")
        self.chunks, self.ps, self.cfg = chunks, ps, cfg
        self.pp, self.vp, self.rank = ps.pp.size, len(chunks), ps.pp.rank
        self.device = ps.device
        self.p2p = P2P(ps.pp, ps.counter, tensor_shape, dtype, ps.device)
        # gloo completes each p2p op on its own, so receives can be posted one op ahead of need;
        # NCCL completes groups in order, where that could deadlock (schedule.post_receives_early)
        self.early_recv = (wait_p2p == "deferred" and self.pp > 1
                           and torch.distributed.get_backend(ps.pp.pg) == "gloo")
        self.trace: list[Op] = []          # the ops of the last call, in the order they ran
        self.timeline: list[tuple[Op, float, float, float]] = []  # (op, start, end, waited)
        self.timer: Callable[[str], contextlib.AbstractContextManager] = lambda category: contextlib.nullcontext()
        self._schedules: dict[tuple[int, bool], list[Op]] = {}
        self._reset()

    def _reset(self):
        self._recv_act: dict = {}
        self._send_act: dict = {}
        self._stash: dict = {}
        self._recv_grad: dict = {}
        self._send_grad: dict = {}
        self._sending: list = []
        self._losses: dict = {}

    def schedule(self, num_microbatches: int, forward_only: bool = False) -> list[Op]:
        """This rank's op list (cached: the schedule depends only on the layout and m)."""
        key = (num_microbatches, forward_only)
        if key not in self._schedules:
            layout = self.layout
            layout.replace(global_batch=num_microbatches * layout.micro_batch * layout.dp).validate(self.cfg.model)
            pp, vp, m = self.pp, self.vp, num_microbatches
            schedules = (forward_only_schedule(pp, vp, m, self.early_recv) if forward_only
                         else build_schedule(self.kind, pp, vp, m, self.early_recv))
            self._schedules[key] = schedules[self.rank]
        return self._schedules[key]

    # ------------------------------------------------------------------ the loop
    def forward_backward(self, get_microbatch: Callable, num_microbatches: int, loss_scale: float,
                         forward_only: bool = False, before_last_backward: Callable | None = None,
                         model_kwargs: Callable | None = None, loss_fn: Callable | None = None) -> list:
        """Run the schedule once. get_microbatch(i) -> (tokens [b, s] or None, labels [b, s] or None):
        the first stage reads tokens, the last reads labels. Gradients accumulate in .grad.
        before_last_backward() runs right before this rank's last B (to turn on DP grad sync).
        model_kwargs(i) -> dict, if given, is passed to every chunk's forward on every stage (the
        microbatch's `packing`: every stage runs attention).
        loss_fn(i, out) -> 0-dim loss sum, if given, replaces out.sum() on the last stage, where out is
        what the last chunk returned for microbatch i (a loss over whole sequences: DPO, reward pairs).

        Returns the per-microbatch loss sums (unscaled, detached 0-dim tensors, microbatch order)
        on the rank holding the last global chunk, and [] on the others."""
        ops = self.schedule(num_microbatches, forward_only)
        last_b = next((op for op in reversed(ops) if op.kind == "B"), None)
        self._reset()
        self.trace, self.timeline = [], []
        for chunk in self.chunks:          # (a chunk that is not a GPTModel, e.g. bubble.py's, has none)
            if getattr(chunk, "moe", None) is not None:
                chunk.moe.clear()          # the MoE/MoD records (model/moe.py) hold this call's only
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            for item in comm_batches(ops):
                if isinstance(item, list):
                    self._post(item)
                    continue
                if item == last_b and before_last_backward is not None:
                    before_last_backward()
                self.trace.append(item)
                start = time.perf_counter()
                with self.timer("compute"):
                    if item.kind == "F":
                        waited = self._forward(item, get_microbatch, loss_scale, forward_only, model_kwargs, loss_fn)
                    else:
                        waited = self._backward(item)
                self.timeline.append((item, start, time.perf_counter(), waited))
                self._sending = [(t, works) for t, works in self._sending if not all(w.is_completed() for w in works)]
        # sends not seen completed are waited on once here; ones that completed were dropped above
        for _, works in self._sending:                                   # sends: done before we return
            self._wait(works)
        self._sending = []
        left = {name: sorted(buf) for name, buf in (("received activations", self._recv_act),
                ("unsent activations", self._send_act), ("unfinished forwards", self._stash),
                ("received grads", self._recv_grad), ("unsent grads", self._send_grad)) if buf}
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: the schedule left buffers behind: {left}")
        losses = [self._losses[mb] for mb in sorted(self._losses)]
        self._losses = {}
        return losses

    def _wait(self, works: list) -> float:
        """Wait for a posted p2p op, exactly once (gloo's wait() on a finished receive blocks for
        the next message); returns the seconds spent waiting."""
        start = time.perf_counter()
        with self.timer("comm_wait"):
            for work in works:
                work.wait()
        return time.perf_counter() - start

    def _received(self, buffers: dict, key: tuple) -> tuple[torch.Tensor, float]:
        tensor, works = buffers.pop(key)
        return tensor, self._wait(works)

    def _post(self, batch: list[Op]) -> None:
        ops = []
        for op in batch:
            key = (op.microbatch, op.chunk)
            if op.kind == "SEND_F":
                ops.append(("send", op.peer, self._send_act.pop(key)))
            elif op.kind == "SEND_B":
                ops.append(("send", op.peer, self._send_grad.pop(key)))
            else:
                ops.append(("recv", op.peer, None))
        for op, (tensor, works) in zip(batch, self.p2p.post(ops)):
            if self.wait_p2p == "batch":
                self._wait(works)
                works = []                       # gloo: a second wait() blocks for another message
            if op.kind == "RECV_F":
                self._recv_act[(op.microbatch, op.chunk)] = (tensor, works)
            elif op.kind == "RECV_B":
                self._recv_grad[(op.microbatch, op.chunk)] = (tensor, works)
            else:
                self._sending.append((tensor, works))
        self.trace += batch

    def _forward(self, op: Op, get_microbatch: Callable, loss_scale: float, forward_only: bool,
                 model_kwargs: Callable | None = None, loss_fn: Callable | None = None) -> float:
        """Runs F; returns the seconds spent waiting for its input."""
        chunk, key = self.chunks[op.chunk], (op.microbatch, op.chunk)
        kwargs = model_kwargs(op.microbatch) if model_kwargs is not None else {}
        tokens = labels = None
        waited = 0.0
        if chunk.pre_process or chunk.post_process:
            tokens, labels = get_microbatch(op.microbatch)
        if chunk.pre_process:
            if tokens is None:
                raise ValueError(f"get_microbatch({op.microbatch}) gave no tokens on the first pipeline stage")
            x = tokens.to(self.device)                                   # [b, s]
        else:
            x, waited = self._received(self._recv_act, key)               # [s/tp, b, h]
            x.requires_grad_(not forward_only)                           # a leaf: its .grad goes back
        if getattr(chunk, "moe", None) is not None:                      # MoE aux losses' weight
            chunk.moe.scale = loss_scale * self.layout.micro_batch * self.layout.seq_len
        if chunk.post_process:
            if labels is None:
                raise ValueError(f"get_microbatch({op.microbatch}) gave no labels on the last pipeline stage")
            per_token = chunk(x, labels.to(self.device), **kwargs)       # [b, s] fp32
            loss_sum = loss_fn(op.microbatch, per_token) if loss_fn is not None else per_token.sum()
            self._losses[op.microbatch] = loss_sum.detach()
            out = loss_sum * loss_scale                                  # what backward starts from
        else:
            out = chunk(x, **kwargs)                                     # [s/tp, b, h]
            self._send_act[key] = out.detach()
        if not forward_only:
            self._stash[key] = (None if chunk.pre_process else x, out)
        return waited

    def _backward(self, op: Op) -> float:
        """Runs B; returns the seconds spent waiting for its output's gradient."""
        chunk, key = self.chunks[op.chunk], (op.microbatch, op.chunk)
        x, out = self._stash.pop(key)
        grad, waited = (None, 0.0) if chunk.post_process else self._received(self._recv_grad, key)  # [s/tp, b, h]
        torch.autograd.backward(out, grad_tensors=grad)                  # grad None: d(loss) = 1
        if x is not None:
            # a chunk whose output ignores its input (none here) would leave no grad: send zeros
            self._send_grad[key] = x.grad if x.grad is not None else torch.zeros_like(x)
        return waited
