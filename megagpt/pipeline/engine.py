"""The pipeline executor: runs this rank's op list from `schedule.build_schedule` over its model chunks.

The schedule is data, so the executor is one loop over it: F runs a chunk's forward, B its
backward, and each run of consecutive comm ops is one batched p2p call. Every buffer is keyed
by (microbatch, local chunk), as the ops are:
  _recv_act   RECV_F -> F     the chunk's input activation      [s/tp, b, h]
  _send_act   F -> SEND_F     the chunk's output activation     [s/tp, b, h]
  _stash      F -> B          (input, output) kept for backward (this is the activation memory)
  _recv_grad  RECV_B -> B     the gradient of the chunk's output
  _send_grad  B -> SEND_B     the gradient of the chunk's input
Each entry is popped by its consumer, so what is held at any time is what the schedule has in
flight: the measured activation memory follows `schedule.simulate`'s peak_inflight.

Loss: the last global chunk turns its per-token losses [b, s] into sum * loss_scale and
backpropagates that. The caller passes loss_scale = 1 / (tokens in the global batch over all
DP ranks), so gradients summed over microbatches (they accumulate in .grad) and over DP are
exactly the one-process gradients of the mean per-token loss.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..config import Config, ConfigError
from ..layout import Layout
from ..model.gpt import GPTModel
from ..parallel.state import ParallelState
from .p2p import P2P
from .schedule import Op, build_schedule, comm_batches


def forward_only_schedule(pp: int, vp: int, m: int) -> list[list[Op]]:
    """Every rank's ops for evaluation: the training schedule's F, SEND_F and RECV_F, in order.

    GPipe's forward half for vp == 1 (it starts each forward as early as possible), interleaved
    1F1B's for vp > 1 (the chunk order that keeps the ring busy). Dropping the backward ops only
    removes waits, and tests check every such filtered schedule with `check_no_deadlock`."""
    base = build_schedule("gpipe" if vp == 1 else "interleaved", pp, vp, m)
    return [[op for op in ops if op.kind in ("F", "SEND_F", "RECV_F")] for ops in base]


class PipelineEngine:
    """Runs forward and backward of num_microbatches over this rank's chunks (local chunk order).

    tensor_shape/dtype: what crosses a stage boundary (`p2p.activation_shape(cfg)`, the
    activation dtype). schedule_kind: gpipe, 1f1b or interleaved (None: cfg.train.schedule;
    1f1b with vp > 1 is interleaved)."""

    def __init__(self, chunks: list[GPTModel], ps: ParallelState, cfg: Config, tensor_shape: tuple,
                 dtype: torch.dtype, schedule_kind: str | None = None):
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
        self.trace: list[Op] = []          # the ops of the last call, in the order they ran
        self._schedules: dict[tuple[int, bool], list[Op]] = {}
        self._reset()

    def _reset(self):
        self._recv_act: dict = {}
        self._send_act: dict = {}
        self._stash: dict = {}
        self._recv_grad: dict = {}
        self._send_grad: dict = {}
        self._losses: dict = {}

    def schedule(self, num_microbatches: int, forward_only: bool = False) -> list[Op]:
        """This rank's op list (cached: the schedule depends only on the layout and m)."""
        key = (num_microbatches, forward_only)
        if key not in self._schedules:
            layout = self.layout
            layout.replace(global_batch=num_microbatches * layout.micro_batch * layout.dp).validate(self.cfg.model)
            pp, vp, m = self.pp, self.vp, num_microbatches
            schedules = forward_only_schedule(pp, vp, m) if forward_only else build_schedule(self.kind, pp, vp, m)
            self._schedules[key] = schedules[self.rank]
        return self._schedules[key]

    # ------------------------------------------------------------------ the loop
    def forward_backward(self, get_microbatch: Callable, num_microbatches: int, loss_scale: float,
                         forward_only: bool = False, before_last_backward: Callable | None = None) -> list:
        """Run the schedule once. get_microbatch(i) -> (tokens [b, s] or None, labels [b, s] or None):
        the first stage reads tokens, the last reads labels. Gradients accumulate in .grad.
        before_last_backward() runs right before this rank's last B (to turn on DP grad sync).

        Returns the per-microbatch loss sums (unscaled, detached 0-dim tensors, microbatch order)
        on the rank holding the last global chunk, and [] on the others."""
        ops = self.schedule(num_microbatches, forward_only)
        last_b = next((op for op in reversed(ops) if op.kind == "B"), None)
        self._reset()
        self.trace = []
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            for item in comm_batches(ops):
                if isinstance(item, list):
                    self._communicate(item)
                elif item.kind == "F":
                    self.trace.append(item)
                    self._forward(item, get_microbatch, loss_scale, forward_only)
                else:
                    if item == last_b and before_last_backward is not None:
                        before_last_backward()
                    self.trace.append(item)
                    self._backward(item)
        left = {name: sorted(buf) for name, buf in (("received activations", self._recv_act),
                ("unsent activations", self._send_act), ("unfinished forwards", self._stash),
                ("received grads", self._recv_grad), ("unsent grads", self._send_grad)) if buf}
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: the schedule left buffers behind: {left}")
        losses = [self._losses[mb] for mb in sorted(self._losses)]
        self._losses = {}
        return losses

    def _communicate(self, batch: list[Op]) -> None:
        ops = []
        for op in batch:
            key = (op.microbatch, op.chunk)
            if op.kind == "SEND_F":
                ops.append(("send", op.peer, self._send_act.pop(key)))
            elif op.kind == "SEND_B":
                ops.append(("send", op.peer, self._send_grad.pop(key)))
            else:
                ops.append(("recv", op.peer, None))
        for op, tensor in zip(batch, self.p2p.communicate(ops)):
            if op.kind == "RECV_F":
                self._recv_act[(op.microbatch, op.chunk)] = tensor
            elif op.kind == "RECV_B":
                self._recv_grad[(op.microbatch, op.chunk)] = tensor
        self.trace += batch

    def _forward(self, op: Op, get_microbatch: Callable, loss_scale: float, forward_only: bool) -> None:
        chunk, key = self.chunks[op.chunk], (op.microbatch, op.chunk)
        tokens = labels = None
        if chunk.pre_process or chunk.post_process:
            tokens, labels = get_microbatch(op.microbatch)
        if chunk.pre_process:
            if tokens is None:
                raise ValueError(f"get_microbatch({op.microbatch}) gave no tokens on the first pipeline stage")
            x = tokens.to(self.device)                                   # [b, s]
        else:
            x = self._recv_act.pop(key)                                  # [s/tp, b, h]
            x.requires_grad_(not forward_only)                           # a leaf: its .grad goes back
        if chunk.post_process:
            if labels is None:
                raise ValueError(f"get_microbatch({op.microbatch}) gave no labels on the last pipeline stage")
            per_token = chunk(x, labels.to(self.device))                 # [b, s] fp32
            loss_sum = per_token.sum()
            self._losses[op.microbatch] = loss_sum.detach()
            out = loss_sum * loss_scale                                  # what backward starts from
        else:
            out = chunk(x)                                               # [s/tp, b, h]
            self._send_act[key] = out.detach()
        if not forward_only:
            self._stash[key] = (None if chunk.pre_process else x, out)

    def _backward(self, op: Op) -> None:
        chunk, key = self.chunks[op.chunk], (op.microbatch, op.chunk)
        x, out = self._stash.pop(key)
        grad = None if chunk.post_process else self._recv_grad.pop(key)  # [s/tp, b, h]; None: d(loss)=1
        torch.autograd.backward(out, grad_tensors=grad)
        if x is not None:
            # a chunk whose output ignores its input (none here) would leave no grad: send zeros
            self._send_grad[key] = x.grad if x.grad is not None else torch.zeros_like(x)
