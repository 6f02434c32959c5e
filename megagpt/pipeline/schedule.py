"""Pipeline-parallel schedules as plain data: GPipe, 1F1B and Megatron's interleaved 1F1B.

A schedule is one list of `Op`s per pipeline rank, in the order that rank runs them. Keeping it
as data, apart from torch, lets fast pure-Python tests check what is painful to debug on GPUs
(every send has its receive, nothing deadlocks, the bubble and the activation memory are what
the papers say: simulate.py) and leaves the executor a plain loop over ops.

Layout: with pp ranks and vp chunks per rank the model is cut into pp*vp chunks. Global chunk c
lives on rank c % pp as local chunk c // pp, so local chunk k of rank r is global chunk k*pp + r
and consecutive global chunks always sit on neighbouring ranks (rank pp-1 hands over to rank 0).
"""
from __future__ import annotations

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


def post_receives_early(ops: list[Op]) -> list[Op]:
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

    early_recv posts each receive one compute op ahead of its consumer (`post_receives_early`):
    what the engine does on gloo. Without it each receive is posted in its send's round, which
    is also safe under NCCL's in-order group completion."""
    _check_layout(pp, vp, m)
    if kind not in ("gpipe", "1f1b", "interleaved"):
        raise ScheduleError(f"unknown schedule kind {kind!r}: expected gpipe, 1f1b or interleaved")
    if kind == "gpipe" and vp > 1:
        raise ScheduleError("gpipe has no interleaved variant: use vp=1 or kind='1f1b'")
    programs = _place_comm([_compute_order(kind, pp, vp, m, r) for r in range(pp)], pp)
    return [post_receives_early(ops) for ops in programs] if early_recv else programs


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
