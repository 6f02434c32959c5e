"""Pipeline-parallel schedules as plain data: GPipe, 1F1B and Megatron's interleaved 1F1B.

A schedule is one list of `Op`s per pipeline rank, in the order that rank runs them. Keeping it
as data, apart from torch, lets fast pure-Python tests check what is painful to debug on GPUs
(every send has its receive, nothing deadlocks, the bubble and the activation memory are what
the papers say) and leaves the executor a plain loop over ops.

Layout: with pp ranks and vp chunks per rank the model is cut into pp*vp chunks. Global chunk c
lives on rank c % pp as local chunk c // pp, so local chunk k of rank r is global chunk k*pp + r
and consecutive global chunks always sit on neighbouring ranks (rank pp-1 hands over to rank 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class ScheduleError(ValueError):
    """A layout that has no schedule, or a schedule that is inconsistent or deadlocks."""


@dataclass(frozen=True)
class Op:
    """One step of a rank's schedule.

    "F"/"B" run the forward/backward of `microbatch` on local model `chunk`. The comm ops move
    the tensors of that same (microbatch, chunk) to or from rank `peer`:
      RECV_F: input activation of the chunk      SEND_F: output activation of the chunk
      RECV_B: gradient of the chunk's output     SEND_B: gradient of the chunk's input
    so an executor can key all its buffers by (microbatch, chunk) and never needs global ids.
    """

    kind: str
    microbatch: int
    chunk: int = 0
    peer: int | None = None

    def __post_init__(self):
        if self.kind not in ("F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B"):
            raise ScheduleError(f"unknown op kind {self.kind!r}")
        if self.is_comm != (self.peer is not None):
            raise ScheduleError(f"{self.kind} op: a peer is needed exactly for comm ops")

    @property
    def is_comm(self) -> bool:
        return self.kind not in ("F", "B")

    def label(self, vp: int = 1) -> str:
        """Short chart label: F3, or F3:1 (microbatch 3, chunk 1) when there are chunks."""
        return f"{self.kind}{self.microbatch}" + (f":{self.chunk}" if vp > 1 else "")


def _check_layout(pp: int, vp: int, m: int, rank: int | None = None) -> None:
    for name, value in (("pp", pp), ("vp", vp), ("microbatches", m)):
        if not isinstance(value, int) or value < 1:
            raise ScheduleError(f"{name} must be a positive integer, got {value!r}")
    if m < pp:
        raise ScheduleError(f"microbatches ({m}) < pp ({pp}): some stages would never be busy at once")
    if vp > 1 and pp == 1:
        raise ScheduleError("vp > 1 needs pp > 1: interleaving chunks on one rank gains nothing")
    if rank is not None and not 0 <= rank < pp:
        raise ScheduleError(f"rank {rank} outside 0..{pp - 1}")


def _one_f_one_b_order(forwards: list, backwards: list, warmup: int) -> list[Op]:
    """`warmup` forwards, then alternate one forward / one backward, then drain the backwards.

    All three schedules have this shape: GPipe is warmup = everything; 1F1B and interleaved
    differ only in the warm-up length and in the order of their (microbatch, chunk) pairs.
    """
    ops = [Op("F", mb, c) for mb, c in forwards[:warmup]]
    for k in range(len(forwards) - warmup):
        ops += [Op("F", *forwards[warmup + k]), Op("B", *backwards[k])]
    ops += [Op("B", mb, c) for mb, c in backwards[len(forwards) - warmup:]]
    return ops


def interleaved_groups(pp: int, m: int) -> list[int]:
    """Sizes of the microbatch groups of interleaved 1F1B: m // pp groups, as even as possible.

    A group runs through chunk 0, then chunk 1, ... before the next group starts. A group of at
    least pp fills the ring of pp ranks, so chunk k's output is back at rank 0 by the time it
    wants chunk k+1. A smaller group would make rank 0 wait for it while holding back the
    backwards the other ranks need: our simulation shows that cycle really stalls, and
    Megatron-Core likewise rejects a last group smaller than pp. So when pp does not divide m
    the leftover m % pp microbatches are spread one each over the first groups.
    """
    count = m // pp
    return [m // count + (1 if g < m % count else 0) for g in range(count)]


def _compute_order(kind: str, pp: int, vp: int, m: int, rank: int) -> list[Op]:
    """One rank's compute ops (F, B) in order: the part of a schedule that is a design choice."""
    if kind == "gpipe" or vp == 1:
        order = [(mb, 0) for mb in range(m)]
        # PipeDream-flush 1F1B: rank r warms up with pp-r-1 forwards, so it holds at most pp-r.
        return _one_f_one_b_order(order, order, m if kind == "gpipe" else pp - rank - 1)
    # Megatron's interleaved 1F1B (Narayanan et al. 2021): the same (microbatch, chunk) order on
    # every rank, group by group; backwards take the same order with the chunks reversed.
    groups, forwards = interleaved_groups(pp, m), []
    for first, size in zip([sum(groups[:g]) for g in range(len(groups))], groups):
        forwards += [(mb, chunk) for chunk in range(vp) for mb in range(first, first + size)]
    backwards = [(mb, vp - 1 - chunk) for mb, chunk in forwards]
    # (vp-1)*group lets the last rank run chunk vp-1 of a microbatch before that microbatch's
    # backward is due; the 2 per downstream rank cover the round trip of that backward. With pp | m the
    # group is pp and this is Megatron's warm-up exactly.
    warmup = min(2 * (pp - rank - 1) + (vp - 1) * max(groups), m * vp)
    return _one_f_one_b_order(forwards, backwards, warmup)


def _message(op: Op, rank: int, pp: int) -> tuple[str, int, int]:
    """What a comm op carries: (F or B, microbatch, global chunk that consumes the tensor)."""
    g = op.chunk * pp + rank
    return {"SEND_F": ("F", op.microbatch, g + 1), "RECV_F": ("F", op.microbatch, g),
            "SEND_B": ("B", op.microbatch, g - 1), "RECV_B": ("B", op.microbatch, g)}[op.kind]


def _place_comm(orders: list[list[Op]], pp: int) -> list[list[Op]]:
    """Add the SEND/RECV ops to the compute orders by running all ranks in lock-step rounds.

    Each round, every rank whose next compute op has its input runs it; then it sends what it
    just produced, and the receiver posts the matching RECV in the same round: as soon as the
    tensor exists, and buffered until its consumer runs (the executor waits on a RECV only right
    before that consumer). This fixes the order of the messages between every pair of ranks,
    which the executor matches in issue order.
    """
    vp = 1 + max(op.chunk for order in orders for op in order)
    last, pos, arrived = pp * vp - 1, [0] * pp, set()
    programs: list[list[Op]] = [[] for _ in range(pp)]
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        sent, before = [], list(pos)
        for rank in range(pp):
            if pos[rank] == len(orders[rank]):
                continue
            op = orders[rank][pos[rank]]
            g, fwd = op.chunk * pp + rank, op.kind == "F"
            if (g > 0 if fwd else g < last) and (op.kind, op.microbatch, g) not in arrived:
                continue  # idle this round: the input has not been sent yet
            programs[rank].append(op)
            pos[rank] += 1
            if g < last if fwd else g > 0:
                peer = (rank + 1) % pp if fwd else (rank - 1) % pp
                send = Op("SEND_F" if fwd else "SEND_B", op.microbatch, op.chunk, peer)
                programs[rank].append(send)
                target = _message(send, rank, pp)
                sent.append((peer, Op("RECV_" + op.kind, op.microbatch, target[2] // pp, rank), target))
        if pos == before:
            raise ScheduleError("compute orders stall: every rank waits for an input")
        for peer, recv, target in sent:
            programs[peer].append(recv)
            arrived.add(target)
    return programs


def _post_receives_early(ops: list[Op]) -> list[Op]:
    """Move each RECV up to just before the compute op that precedes its consumer (Megatron's
    one-ahead irecv), never past an earlier RECV from the same peer, since messages between two
    ranks match in issue order. A RECV already earlier stays where it is, so at most one compute
    op's worth of receive buffers is posted ahead of need. gloo only: a receive is then posted
    before the sender's batch, which NCCL, completing each rank's batches in order, can deadlock
    on (`check_no_deadlock(..., backend="nccl")` finds such cycles); gloo completes each op once
    both ends are posted. Posted early, the transfer overlaps the op before its consumer instead
    of starting after it (gloo too only moves data once the receive is posted)."""
    compute_at = {(op.kind, op.microbatch, op.chunk): i for i, op in enumerate(ops) if not op.is_comm}
    keyed, floor = [], {}                           # (sort key, position, op); peer -> key of its last RECV
    previous_compute, before = -1, {}               # compute index -> index of the compute op before it
    for i, op in enumerate(ops):
        if not op.is_comm:
            before[i], previous_compute = previous_compute, i
    for i, op in enumerate(ops):
        key = float(i)
        if op.kind.startswith("RECV"):
            preceding = before[compute_at[(op.kind[-1], op.microbatch, op.chunk)]]
            key = max(min(key, preceding - 0.5), floor.get(op.peer, -1.0) + 1e-6)
            floor[op.peer] = key
        keyed.append((key, i, op))
    return [op for _, _, op in sorted(keyed)]


def build_schedule(kind: str, pp: int, vp: int, m: int, early_recv: bool = False) -> list[list[Op]]:
    """All ranks' schedules. kind: "gpipe" or "1f1b" (interleaved when vp > 1) or "interleaved".

    early_recv posts each receive one compute op ahead of its consumer (`_post_receives_early`):
    what the engine does on gloo. Without it each receive is posted in its send's round, which
    is also safe under NCCL's in-order group completion."""
    _check_layout(pp, vp, m)
    if kind not in ("gpipe", "1f1b", "interleaved"):
        raise ScheduleError(f"unknown schedule kind {kind!r}: expected gpipe, 1f1b or interleaved")
    if kind == "gpipe" and vp > 1:
        raise ScheduleError("gpipe has no interleaved variant: use vp=1 or kind='1f1b'")
    programs = _place_comm([_compute_order(kind, pp, vp, m, r) for r in range(pp)], pp)
    return [_post_receives_early(ops) for ops in programs] if early_recv else programs


def gpipe(pp: int, m: int, rank: int) -> list[Op]:
    """GPipe: all forwards, then all backwards. Same bubble as 1F1B but holds all m microbatches."""
    _check_layout(pp, 1, m, rank)
    return build_schedule("gpipe", pp, 1, m)[rank]


def one_f_one_b(pp: int, m: int, rank: int) -> list[Op]:
    """PipeDream-flush 1F1B: pp-rank-1 warm-up forwards, then one forward / one backward."""
    _check_layout(pp, 1, m, rank)
    return build_schedule("1f1b", pp, 1, m)[rank]


def interleaved_1f1b(pp: int, vp: int, m: int, rank: int) -> list[Op]:
    """Megatron's interleaved 1F1B with vp chunks per rank, any m >= pp; vp == 1 is plain 1F1B.

    Rank r warms up with 2*(pp-r-1) + (vp-1)*g chunk-forwards (capped at m*vp), g the largest
    group of `interleaved_groups` (g == pp when pp divides m).
    """
    _check_layout(pp, vp, m, rank)
    return build_schedule("interleaved", pp, vp, m)[rank]


def comm_batches(ops: list[Op]) -> list:
    """A rank's ops as the executor posts them: compute ops stay single, and each maximal run of
    consecutive comm ops becomes one list, posted together (one NCCL group)."""
    items: list = []
    for op in ops:
        if not op.is_comm:
            items.append(op)
        elif items and isinstance(items[-1], list):
            items[-1].append(op)
        else:
            items.append([op])
    return items


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
