"""Checking and timing schedules as the executor runs them: message matching, freedom from deadlock
under each backend's completion rules, and a simulator of the engine's real waits.

The schedule (schedule.py) says what each rank does; this module says what happens when the
engine (engine.py) runs it: posting a comm op never waits, a compute op waits for its input's
receive, sends are waited on at the end. `check_no_deadlock` proves that terminates (NCCL's
in-order group completion, or gloo's per-op completion); `simulate` times it, so its bubble is
the one the engine shows (tests/test_pipeline_bubble.py measures the engine against it);
`render` draws the timeline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .schedule import Op, ScheduleError, _message, comm_batches


def _match_messages(schedules: list[list[Op]]) -> dict[tuple[int, int], tuple[int, int]]:
    """Pair every comm op with its partner: (rank, op index) <-> (peer, op index).

    p2p messages between two ranks are matched in issue order, whatever the tensor, so for each
    ordered pair (src, dst) the k-th send must carry the k-th receive's tensor."""
    pp = len(schedules)
    streams: dict[tuple, list] = {}  # ("send"|"recv", src, dst) -> [(message, rank, op index)]
    for rank, ops in enumerate(schedules):
        for index, op in enumerate(ops):
            if not op.is_comm:
                continue
            if not 0 <= op.peer < pp or op.peer == rank:
                raise ScheduleError(f"rank {rank}: {op} has a bad peer")
            side = "send" if op.kind.startswith("SEND") else "recv"
            src, dst = (rank, op.peer) if side == "send" else (op.peer, rank)
            streams.setdefault((side, src, dst), []).append((_message(op, rank, pp), rank, index))
    partner = {}
    for (side, src, dst), ends in streams.items():
        other = streams.get(("recv" if side == "send" else "send", src, dst), [])
        if side == "recv" and not other:
            raise ScheduleError(f"rank {dst} receives {len(ends)} tensors that {src} never sends")
        if [e[0] for e in ends] != [o[0] for o in other]:
            sends, recvs = (ends, other) if side == "send" else (other, ends)
            raise ScheduleError(f"sends {src}->{dst} do not match receives in order: "
                                f"{[s[0] for s in sends]} vs {[r[0] for r in recvs]}")
        for (_, r, i), (_, pr, pi) in zip(ends, other):
            partner[(r, i)] = (pr, pi)
    return partner


def _input_recv(ops: list[Op]) -> dict[int, int]:
    """compute op index -> index of the RECV that brings its input (RECV_F -> F, RECV_B -> B)."""
    recv_at = {(op.kind[-1], op.microbatch, op.chunk): i for i, op in enumerate(ops) if op.kind.startswith("RECV")}
    return {i: recv_at[(op.kind, op.microbatch, op.chunk)] for i, op in enumerate(ops)
            if not op.is_comm and (op.kind, op.microbatch, op.chunk) in recv_at}


def check_no_deadlock(schedules: list[list[Op]], backend: str = "nccl") -> int:
    """Prove the comm ops match pairwise and that the executor's execution terminates.

    The executor's semantics (engine.py): each run of consecutive comm ops is posted as one
    non-blocking batch, and posting never waits; a compute op waits until its input's RECV has
    completed; sends are waited on at the end. When an op completes depends on the backend:
      nccl: a batch is one group on one stream, so batches complete in the order each rank
            posted them, and only once every partner op is posted and the partner's earlier
            batches have completed too (the strictest model; it holds for gloo as well);
      gloo: each op completes as soon as both its ends are posted.
    Completion is monotone, so the greedy sweep reaches the unique fixed point: a rank left short
    of its end deadlocks in every execution. Returns the number of batches.
    """
    if backend not in ("nccl", "gloo"):
        raise ScheduleError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    pp = len(schedules)
    partner = _match_messages(schedules)
    items = [comm_batches(ops) for ops in schedules]
    batch_of: dict[tuple[int, int], int] = {}     # (rank, op index) -> batch number on that rank
    for rank, ops in enumerate(schedules):
        index = number = 0
        for item in items[rank]:
            if isinstance(item, list):
                for _ in item:
                    batch_of[(rank, index)] = number
                    index += 1
                number += 1
            else:
                index += 1
    batches = [[[i for (r, i), b in batch_of.items() if r == rank and b == n]
                for n in range(1 + max([b for (r, _), b in batch_of.items() if r == rank], default=-1))]
               for rank in range(pp)]
    needs = [_input_recv(ops) for ops in schedules]
    pos, posted, completed = [0] * pp, [0] * pp, [0] * pp  # op index; batches posted, completed

    def _done(rank, i):                    # has comm op i of rank completed?
        if backend == "nccl":
            return batch_of[(rank, i)] < completed[rank]
        peer, j = partner[(rank, i)]
        return pos[peer] > j               # gloo: the partner op is posted (this one is, being behind pos)
    progress = True
    while progress:
        progress = False
        for rank in range(pp):             # complete batches in order, as far as partners allow
            while backend == "nccl" and completed[rank] < posted[rank]:
                peers = [(partner[(rank, i)], batch_of[partner[(rank, i)]]) for i in batches[rank][completed[rank]]]
                if any(b >= posted[pr] or b > completed[pr] for (pr, _), b in peers):
                    break
                completed[rank] += 1
                progress = True
        for rank in range(pp):             # post and compute as far as inputs allow
            ops = schedules[rank]
            while pos[rank] < len(ops):
                i = pos[rank]
                if ops[i].is_comm:
                    n = batch_of[(rank, i)]
                    posted[rank] = max(posted[rank], n + 1)
                elif i in needs[rank] and not _done(rank, needs[rank][i]):
                    break
                pos[rank] += 1
                progress = True
    stuck = [f"rank {r} at {schedules[r][pos[r]]}" for r in range(pp) if pos[r] < len(schedules[r])]
    stuck += [f"rank {r}: batch {completed[r]} never completes" for r in range(pp)
              if backend == "nccl" and not stuck and completed[r] < len(batches[r])]
    if stuck:
        raise ScheduleError("deadlock: " + "; ".join(stuck))
    return sum(len(b) for b in batches)


@dataclass
class Simulation:
    """Result of `simulate`: timelines are per rank lists of (start, end, op) for compute ops."""

    pp: int
    vp: int
    microbatches: int
    timelines: list[list[tuple[float, float, Op]]]
    makespan: float
    ideal: float                     # compute time of one rank: m * (t_f + t_b)
    bubble: list[float]              # per rank: idle time in [0, makespan] / ideal
    bubble_fraction: float           # all ranks: total idle / total ideal
    peak_inflight: list[int]         # per rank: max (microbatch, chunk) forwards awaiting backward
    peak_inflight_stages: list[float]  # the same in full-stage activations: peak_inflight / vp


def simulate(schedules: list[list[Op]], t_f: float = 1.0, t_b: float = 2.0,
             t_comm: float = 0.0, p2p: str = "async") -> Simulation:
    """Time the schedules as the executor runs them: the same blocking points, in the same order.

    t_f and t_b are the costs of a whole stage (all of a rank's layers) on one microbatch, so a
    chunk costs t_f/vp and t_b/vp: with vp > 1 each chunk holds 1/vp of the rank's layers and
    the total work per rank, m*(t_f + t_b), is the same as with vp = 1. That makes bubbles of
    different vp directly comparable. A message arrives t_comm after both its ends are posted.
    p2p="async" is the engine: posting a comm op never waits, a compute op waits for its
    input's arrival, and a rank ends once its sends have arrived. p2p="blocking" is the engine
    with wait_p2p="batch" (the executor before overlap): each batch of comm ops waits until all
    its messages have arrived, so a rank also waits for its peers' sends it does not yet need.
    """
    if p2p not in ("async", "blocking"):
        raise ScheduleError(f"p2p must be 'async' or 'blocking', got {p2p!r}")
    pp = len(schedules)
    compute = [[op for op in ops if not op.is_comm] for ops in schedules]
    vp = 1 + max(op.chunk for ops in compute for op in ops)
    m = 1 + max(op.microbatch for ops in compute for op in ops)
    last = pp * vp - 1
    partner = _match_messages(schedules)
    needs = [_input_recv(ops) for ops in schedules]
    items = [comm_batches(ops) for ops in schedules]
    posted: dict[tuple[int, int], float] = {}     # (rank, op index) -> time the op was posted
    end: dict[tuple[str, int, int], float] = {}   # (kind, microbatch, global chunk) -> end time
    timelines: list[list] = [[] for _ in range(pp)]
    item_pos, op_pos, clock = [0] * pp, [0] * pp, [0.0] * pp

    def arrival(rank, i):                         # None until both ends are posted
        other = partner[(rank, i)]
        if other not in posted:
            return None
        return max(posted[(rank, i)], posted[other]) + t_comm

    progress = True
    while progress:
        progress = False
        for rank in range(pp):
            while item_pos[rank] < len(items[rank]):
                item, first = items[rank][item_pos[rank]], op_pos[rank]
                if isinstance(item, list):
                    for k in range(len(item)):
                        posted.setdefault((rank, first + k), clock[rank])
                    if p2p == "blocking":
                        arrivals = [arrival(rank, first + k) for k in range(len(item))]
                        if None in arrivals:
                            break
                        clock[rank] = max([clock[rank]] + arrivals)
                    op_pos[rank] += len(item)
                else:
                    op, g = item, item.chunk * pp + rank
                    ready = clock[rank]
                    if first in needs[rank]:
                        got = arrival(rank, needs[rank][first])
                        if got is None:
                            break
                        ready = max(ready, got)
                    deps = [("F", op.microbatch, g - 1)] if op.kind == "F" and g > 0 else []
                    if op.kind == "B":
                        deps = [("F", op.microbatch, g)] + ([("B", op.microbatch, g + 1)] if g < last else [])
                    if any(d not in end for d in deps):
                        break                     # waits on data not produced yet (or never sent)
                    if (op.kind, op.microbatch, g) in end:
                        raise ScheduleError(f"rank {rank} runs {op} twice")
                    start = max([ready] + [end[d] for d in deps])
                    clock[rank] = start + (t_f if op.kind == "F" else t_b) / vp
                    end[(op.kind, op.microbatch, g)] = clock[rank]
                    timelines[rank].append((start, clock[rank], op))
                    op_pos[rank] += 1
                item_pos[rank] += 1
                progress = True
    if any(item_pos[r] < len(items[r]) for r in range(pp)):
        stuck = [f"rank {r} waits at {items[r][item_pos[r]]}" for r in range(pp) if item_pos[r] < len(items[r])]
        raise ScheduleError("schedule stalls on data dependencies: " + "; ".join(stuck))
    if len(end) != 2 * m * pp * vp:
        raise ScheduleError(f"{len(end)} compute ops ran, expected F and B of {m} microbatches x {pp * vp} chunks")

    # a rank is done once its last op ran and its sends have arrived (the executor waits for them)
    finish = [max([clock[r]] + [arrival(r, i) for i, op in enumerate(schedules[r]) if op.kind.startswith("SEND")])
              for r in range(pp)]
    makespan = max(finish)
    ideal = m * (t_f + t_b)
    bubble = [(makespan - sum(e - s for s, e, _ in tl)) / ideal for tl in timelines]
    peaks = []
    for ops in compute:
        held = peak = 0
        for op in ops:
            held += 1 if op.kind == "F" else -1
            peak = max(peak, held)
        peaks.append(peak)
    return Simulation(pp, vp, m, timelines, makespan, ideal, bubble, sum(bubble) / pp,
                      peaks, [p / vp for p in peaks])


def render(sim: Simulation, width: int | None = None) -> str:
    """A text Gantt chart, one line per rank: ops show their label (F3, or F3:1 with chunks),
    idle time is '.'. By default the scale gives the shortest op room for its label; `width`
    fixes the chart's columns instead (labels are then cut to fit)."""
    ops = [(s, e, op) for tl in sim.timelines for s, e, op in tl]
    if width is None:
        label = max(len(op.label(sim.vp)) for _, _, op in ops) + 1
        scale = label / min(e - s for s, e, _ in ops)
        width = math.ceil(sim.makespan * scale - 1e-9)
    else:
        scale = width / sim.makespan
    lines = []
    for rank, timeline in enumerate(sim.timelines):
        cells = ["."] * width
        for start, end, op in timeline:
            a, b = round(start * scale), min(round(end * scale), width)
            cells[a:b] = op.label(sim.vp).ljust(b - a)[: b - a]
        lines.append(f"rank {rank:>{len(str(sim.pp - 1))}} |{''.join(cells)}|")
    return "\n".join(lines)
