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

    Each round, every rank whose next compute op has its input runs it; then each rank sends
    what it just produced and receives everything sent to it this round. So a RECV sits in the
    same round as its SEND (posted eagerly, like Megatron's, and buffered until the consumer
    runs). Posting round t's comm ops never needs anything from a later round, so every round's
    batches get posted and complete: no deadlock, as `check_no_deadlock` confirms. Receiving
    only right before the consumer looks simpler but deadlocks interleaved schedules: with the
    wrap-around from rank pp-1 to rank 0, a rank blocks sending a gradient to a peer that is
    itself blocked receiving an input that rank has not sent yet (see the tests).
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


def build_schedule(kind: str, pp: int, vp: int, m: int) -> list[list[Op]]:
    """All ranks' schedules. kind: "gpipe" or "1f1b" (interleaved when vp > 1) or "interleaved"."""
    _check_layout(pp, vp, m)
    if kind not in ("gpipe", "1f1b", "interleaved"):
        raise ScheduleError(f"unknown schedule kind {kind!r}: expected gpipe, 1f1b or interleaved")
    if kind == "gpipe" and vp > 1:
        raise ScheduleError("gpipe has no interleaved variant: use vp=1 or kind='1f1b'")
    return _place_comm([_compute_order(kind, pp, vp, m, r) for r in range(pp)], pp)


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
    """A rank's ops as the executor runs them: compute ops stay single, and each maximal run of
    consecutive comm ops becomes one list, to post as one batch_isend_irecv."""
    items: list = []
    for op in ops:
        if not op.is_comm:
            items.append(op)
        elif items and isinstance(items[-1], list):
            items[-1].append(op)
        else:
            items.append([op])
    return items


def check_no_deadlock(schedules: list[list[Op]]) -> int:
    """Prove the comm ops match pairwise and that blocking batched execution terminates.

    Matching: p2p messages between two ranks are paired in issue order, whatever the tensor, so
    for each ordered pair (src, dst) the k-th send must carry the k-th receive's tensor.
    Execution model (the strictest the executor can meet): each maximal run of consecutive comm
    ops is one blocking batch_isend_irecv, which returns only once the peer op matching every
    op in it is posted, i.e. its rank has reached or passed that op's batch. Compute never
    blocks here (data deps are `simulate`'s job). Once posted an op stays posted, so progress is
    monotone and the greedy sweep below reaches the unique fixed point: if it leaves a rank
    short of its end, every execution deadlocks there. Returns the number of batches run.
    """
    pp = len(schedules)
    batches = [comm_batches(ops) for ops in schedules]
    streams: dict[tuple, list] = {}  # ("send"|"recv", src, dst) -> [(message, rank, item index)]
    for rank, items in enumerate(batches):
        for index, batch in enumerate(items):
            for op in batch if isinstance(batch, list) else []:
                if not 0 <= op.peer < pp or op.peer == rank:
                    raise ScheduleError(f"rank {rank}: {op} has a bad peer")
                side = "send" if op.kind.startswith("SEND") else "recv"
                src, dst = (rank, op.peer) if side == "send" else (op.peer, rank)
                streams.setdefault((side, src, dst), []).append((_message(op, rank, pp), rank, index))

    partner: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (rank, batch) -> peers' items
    for (side, src, dst), sends in streams.items():
        if side != "send":
            continue
        recvs = streams.get(("recv", src, dst), [])
        if [s[0] for s in sends] != [r[0] for r in recvs]:
            raise ScheduleError(f"sends {src}->{dst} do not match receives in order: "
                                f"{[s[0] for s in sends]} vs {[r[0] for r in recvs]}")
        for (_, sr, si), (_, rr, ri) in zip(sends, recvs):
            partner.setdefault((sr, si), []).append((rr, ri))
            partner.setdefault((rr, ri), []).append((sr, si))
    for (side, src, dst), recvs in streams.items():
        if side == "recv" and ("send", src, dst) not in streams:
            raise ScheduleError(f"rank {dst} receives {len(recvs)} tensors that {src} never sends")

    pos, done, progress = [0] * pp, 0, True
    while progress:
        progress = False
        for rank in range(pp):
            while pos[rank] < len(batches[rank]):
                item = batches[rank][pos[rank]]
                if isinstance(item, list):
                    if any(pos[pr] < pi for pr, pi in partner[(rank, pos[rank])]):
                        break
                    done += 1
                pos[rank] += 1
                progress = True
    stuck = [f"rank {r} at {batches[r][pos[r]]}" for r in range(pp) if pos[r] < len(batches[r])]
    if stuck:
        raise ScheduleError("deadlock: " + "; ".join(stuck))
    return done


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
             t_comm: float = 0.0) -> Simulation:
    """Run the compute ops as early as data dependencies and each rank's order allow.

    t_f and t_b are the costs of a whole stage (all of a rank's layers) on one microbatch, so a
    chunk costs t_f/vp and t_b/vp: with vp > 1 each chunk holds 1/vp of the rank's layers and
    the total work per rank, m*(t_f + t_b), is the same as with vp = 1. That makes bubbles of
    different vp directly comparable. F(i) on global chunk c waits for F(i) on c-1; B(i) on c
    waits for B(i) on c+1 and F(i) on c; a dependency on another rank adds t_comm. Comm ops
    are not events themselves (`check_no_deadlock` covers their ordering).
    """
    pp = len(schedules)
    compute = [[op for op in ops if not op.is_comm] for ops in schedules]
    vp = 1 + max(op.chunk for ops in compute for op in ops)
    m = 1 + max(op.microbatch for ops in compute for op in ops)
    last = pp * vp - 1
    end: dict[tuple[str, int, int], float] = {}  # (kind, microbatch, global chunk) -> end time
    timelines: list[list] = [[] for _ in range(pp)]
    pos, free, progress = [0] * pp, [0.0] * pp, True
    while progress:
        progress = False
        for rank in range(pp):
            while pos[rank] < len(compute[rank]):
                op = compute[rank][pos[rank]]
                g = op.chunk * pp + rank
                deps = [("F", op.microbatch, g - 1)] if op.kind == "F" and g > 0 else []
                if op.kind == "B":
                    deps = [("F", op.microbatch, g)] + ([("B", op.microbatch, g + 1)] if g < last else [])
                if any(d not in end for d in deps):
                    break
                if (op.kind, op.microbatch, g) in end:
                    raise ScheduleError(f"rank {rank} runs {op} twice")
                start = max([free[rank]] + [end[d] + (t_comm if d[2] % pp != rank else 0.0) for d in deps])
                free[rank] = start + (t_f if op.kind == "F" else t_b) / vp
                end[(op.kind, op.microbatch, g)] = free[rank]
                timelines[rank].append((start, free[rank], op))
                pos[rank] += 1
                progress = True
    if any(pos[r] < len(compute[r]) for r in range(pp)):
        stuck = [f"rank {r} waits at {compute[r][pos[r]]}" for r in range(pp) if pos[r] < len(compute[r])]
        raise ScheduleError("schedule stalls on data dependencies: " + "; ".join(stuck))
    if len(end) != 2 * m * pp * vp:
        raise ScheduleError(f"{len(end)} compute ops ran, expected F and B of {m} microbatches x {pp * vp} chunks")

    makespan = max(free)
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
