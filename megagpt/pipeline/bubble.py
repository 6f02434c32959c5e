"""Measure the pipeline bubble on the real engine: pp forked ranks over gloo, chunks that only sleep.

The chunks stand in for model chunks: a forward sleeps t_f/vp and a backward t_b/vp (t_f, t_b
are a whole stage's times, as in `simulate.simulate`), so the compute is known exactly and what
the measurement shows is the executor itself: its order, its p2p and where it waits. Everything
else is the training path: `PipelineEngine`, its schedule, its non-blocking p2p over gloo.

    measure_bubble(pp=4, vp=2, m=8, t_f=0.06, t_b=0.12) -> {"measured": ..., "simulated": ..., "ideal": ...}

Measured bubble of a rank = (makespan - its busy time) / its busy time, where the makespan runs
from the first rank's start to the last rank's end (time.perf_counter is CLOCK_MONOTONIC, one
clock for all forked ranks) and busy time is the sum of its F/B ops minus the time they waited
for their input (the engine's `timeline`). The overall figure is the mean over ranks, as in
`simulate`. Timing runs are preceded by one warm-up run. Noise on a shared machine only ever
adds time (a late wake-up, a descheduled rank), so the figure reported is the best of `repeats`
runs, as timeit does; every run's figure is returned too.
"""
from __future__ import annotations

import time

import torch

from ..config import config_from_dict
from ..parallel.spawn import spawn
from ..parallel.state import ParallelState
from .engine import PipelineEngine
from .schedule import build_schedule
from .simulate import simulate

HIDDEN, SEQ, MICRO = 8, 4, 1                   # what crosses a boundary: a [4, 1, 8] fp32 tensor


class _Sleep(torch.autograd.Function):
    """Identity whose forward sleeps t_f and backward sleeps t_b: compute of a known cost."""

    @staticmethod
    def forward(ctx, x, t_f, t_b):
        ctx.t_b = t_b
        time.sleep(t_f)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.t_b)
        return grad.clone(), None, None


class SleepChunk(torch.nn.Module):
    """A model chunk for the engine: tokens [b, s] or activations [s, b, h] in, activations (or
    per-token losses [b, s] on the last chunk) out, after sleeping t_f forward and t_b backward."""

    def __init__(self, t_f: float, t_b: float, pre_process: bool, post_process: bool):
        super().__init__()
        self.t_f, self.t_b = t_f, t_b
        self.pre_process, self.post_process = pre_process, post_process
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, labels=None):
        if self.pre_process:
            x = self.weight * torch.ones(SEQ, MICRO, HIDDEN)                 # [s, b, h] from tokens [b, s]
        y = _Sleep.apply(x, self.t_f, self.t_b) * self.weight              # [s, b, h]
        return y.sum(-1).transpose(0, 1) if self.post_process else y       # [b, s] losses, or [s, b, h]


def _config(pp: int, vp: int, m: int, kind: str):
    raw = {"model": dict(vocab_size=16, max_seq_len=SEQ, hidden_size=HIDDEN, num_layers=pp * vp, num_heads=1,
                         ffn_hidden_size=HIDDEN, make_vocab_divisible_by=1),
           "parallel": dict(pp=pp, vp=vp),
           "train": dict(seq_len=SEQ, micro_batch_size=MICRO, global_batch_size=MICRO * m, schedule=kind)}
    return config_from_dict(raw, world_size=pp)


def _worker(rank, world, vp, m, t_f, t_b, kind, wait_p2p, repeats):
    cfg = _config(world, vp, m, kind)
    ps = ParallelState.create(pp=world)
    last = world * vp - 1
    chunks = [SleepChunk(t_f / vp, t_b / vp, pre_process=k * world + rank == 0, post_process=k * world + rank == last)
              for k in range(vp)]
    engine = PipelineEngine(chunks, ps, cfg, (SEQ, MICRO, HIDDEN), torch.float32, schedule_kind=kind,
                            wait_p2p=wait_p2p)
    tokens = torch.zeros(MICRO, SEQ, dtype=torch.long)
    runs = []
    for run in range(repeats + 1):                                      # run 0 warms up
        ps.pp.all_reduce(torch.zeros(1))                                # start together
        start = time.perf_counter()
        engine.forward_backward(lambda i: (tokens, tokens), m, loss_scale=1.0)
        end = time.perf_counter()
        busy = sum(e - s - waited for _, s, e, waited in engine.timeline)
        if run:
            runs.append([start, end, busy])
    return runs


def measure_bubble(pp: int, vp: int, m: int, t_f: float, t_b: float, kind: str = "1f1b",
                   wait_p2p: str = "deferred", repeats: int = 1) -> dict:
    """Run the engine on pp forked ranks and return the measured, simulated and ideal bubbles."""
    deferred = wait_p2p == "deferred"                                   # what the engine runs on gloo:
    schedules = build_schedule(kind, pp, vp, m, early_recv=deferred)    # (bad layouts fail here, before forking)
    sim = simulate(schedules, t_f=t_f, t_b=t_b, p2p="async" if deferred else "blocking")
    per_rank = spawn(pp, _worker, vp, m, t_f, t_b, kind, wait_p2p, repeats, timeout=60 + 4 * (repeats + 1) * m * (t_f + t_b))
    bubbles, makespans = [], []
    for k in range(repeats):
        runs = [per_rank[r][k] for r in range(pp)]
        makespan = max(r[1] for r in runs) - min(r[0] for r in runs)
        bubbles.append(sum((makespan - busy) / busy for _, _, busy in runs) / pp)
        makespans.append(makespan)
    return {"kind": "interleaved" if vp > 1 else kind, "pp": pp, "vp": vp, "microbatches": m, "t_f": t_f,
            "t_b": t_b, "wait_p2p": wait_p2p, "measured": min(bubbles), "measured_runs": bubbles,
            "makespan": min(makespans), "simulated": sim.bubble_fraction,
            "ideal": (pp - 1) / (vp * m)}
