"""Which saved bytes make one rank's piece of a tensor (pure index arithmetic, no files), and the
vocab re-padding rule (`kept_rows`, `fit_rows`).

A TP piece of a global tensor is a box: along its ShardSpec's dim a list of runs (local_start,
global_start, length), every other dim whole. A rank's piece under one layout is cut from the pieces
another layout saved by intersecting the runs in global coordinates, so a reader pulls exactly the
elements it needs: `box_reads` for parameters (stored in their local shape: one multi-dim slice per
intersection) and `flat_reads` for optimizer state (stored flat, in DP shards that tile each TP
piece's flattened local tensor). Replicated pieces (the K/V heads that several TP ranks hold) are
read once. `rows`: the saved vocab rows when the padded vocab differs between the layouts; rows at or
beyond it are not read (the caller's buffer holds zeros there).
"""
from __future__ import annotations

import itertools
import math

import torch

from ..parallel.layers import ShardSpec
from .store import CheckpointError

Run = tuple[int, int, int]          # (local start, global start, length) along one dim, or of a flat block


def axis_runs(spec: ShardSpec, shape: tuple, rank: int, size: int) -> tuple[int, list[Run]]:
    """(dim, runs) of a rank's piece: the dim its ShardSpec cuts (0 when replicated) and its runs."""
    if spec.dim is None or size == 1:
        return (0 if spec.dim is None else spec.dim), [(0, 0, shape[0 if spec.dim is None else spec.dim])]
    return spec.dim, [r for r in spec.pieces(rank, size) if r[2]]


def intersect(a: list[Run], b: list[Run]) -> list[Run]:
    """(a's local start, b's local start, length) of every overlap of two run lists, each sorted by
    global start (as every piece's runs are)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        (la, ga, na), (lb, gb, nb) = a[i], b[j]
        lo, hi = max(ga, gb), min(ga + na, gb + nb)
        if lo < hi:
            out.append((la + lo - ga, lb + lo - gb, hi - lo))
        if ga + na <= gb + nb:
            i += 1
        else:
            j += 1
    return out


def subtract(runs: list[Run], covered: list[tuple[int, int]]) -> list[Run]:
    """The parts of `runs` outside the global intervals `covered` [(start, end)]."""
    out = []
    for local, start, n in runs:
        pieces = [(start, start + n)]
        for c0, c1 in covered:
            pieces = [p for a, z in pieces for p in ((a, min(z, c0)), (max(a, c1), z)) if p[0] < p[1]]
        out += [(local + a - start, a, z - a) for a, z in pieces]
    return out


def clip(runs: list[Run], hi: int) -> list[Run]:
    """Runs cut to global [0, hi)."""
    return [(local, start, min(n, hi - start)) for local, start, n in runs if start < hi]


def fit_rows(name: str, full: torch.Tensor, vocab_rows: int | None, shape: tuple) -> torch.Tensor:
    """A global tensor in this model's global shape: only the vocab padding may differ (its rows are
    re-padded with zeros); anything else is an error that names the tensor."""
    rows = kept_rows(name, tuple(full.shape), vocab_rows, tuple(shape))
    if rows is None:
        return full
    out = full.new_zeros(shape)
    out[:rows] = full[:rows]
    return out


def kept_rows(name: str, saved: tuple, vocab_rows: int | None, shape: tuple) -> int | None:
    """None when the saved global shape is this model's; the rows to keep when only the padding differs."""
    if saved == shape:
        return None
    if vocab_rows is not None and saved[1:] == shape[1:] and shape[0] >= vocab_rows:
        return vocab_rows
    raise CheckpointError(f"{name}: the checkpoint's global shape is {saved}, this model's is {shape}")


def _merge(runs: list[Run]) -> list[Run]:
    out = []
    for local, start, n in runs:
        if out and out[-1][0] + out[-1][2] == local and out[-1][1] + out[-1][2] == start:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n)
        else:
            out.append((local, start, n))
    return out


def _saved_runs(saved: list[tuple], dim: int, rank: int) -> list[list[Run]]:
    """Each saved piece's runs less what an earlier piece holds (replicas are read once). The piece of
    the same TP rank comes first: what this rank saved itself is read from its own file."""
    covered, out = [], [[] for _ in saved]
    first = rank % len(saved)
    for i in [first] + [i for i in range(len(saved)) if i != first]:
        d, runs = axis_runs(*saved[i])
        if d != dim:
            raise ValueError(f"saved pieces cut different dims ({d} and {dim})")
        out[i] = subtract(runs, covered)
        covered += [(g, g + n) for _, g, n in runs]
    return out


def box_reads(want: tuple, saved: list[tuple], rows: int | None = None) -> tuple[list[tuple[int, tuple, tuple]], int]:
    """want, saved[i]: (spec, global shape, tp rank, tp size). -> ([(saved index, source slices, target
    slices)] that fill want's local tensor, rows >= `rows` of dim 0 excepted; the elements they must cover)."""
    spec, shape, rank, size = want
    dim, runs = axis_runs(spec, shape, rank, size)
    wanted = {k: [(0, 0, shape[k])] for k in range(len(shape))}
    wanted[dim] = runs
    if rows is not None:
        wanted[0] = clip(wanted[0], rows)
    sdim = axis_runs(*saved[0])[0]
    reads = []
    for i, runs_i in enumerate(_saved_runs(saved, sdim, rank)):
        have = {k: [(0, 0, saved[i][1][k])] for k in range(len(shape))}
        have[sdim] = runs_i
        per_dim = [intersect(have[k], wanted[k]) for k in range(len(shape))]
        for combo in itertools.product(*per_dim):
            reads.append((i, tuple(slice(s, s + n) for s, _, n in combo), tuple(slice(t, t + n) for _, t, n in combo)))
    return reads, math.prod(sum(n for *_, n in wanted[k]) for k in range(len(shape)))


def flat_blocks(dim: int, runs: list[Run], local_shape: tuple, shape: tuple) -> list[Run]:
    """(local flat start, global flat start, length) of a piece's runs along `dim`, merged."""
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    ld, gd = local_shape[dim], shape[dim]
    return _merge([((o * ld + local) * inner, (o * gd + start) * inner, n * inner)
                   for o in range(outer) for local, start, n in runs])


def flat_reads(want: tuple, start: int, end: int, saved: list[tuple], shards: list[list[tuple]],
               rows: int | None = None) -> tuple[list[tuple], int]:
    """Flat [start, end) of want's local tensor from the saved pieces' flat DP shards.
    want, saved[i]: (spec, global shape, tp rank, tp size); shards[i]: [(file, lo, hi)] of saved piece i,
    sorted by lo. -> ([(file, saved flat index, offset in the target, length)], the elements they must cover)."""
    spec, shape, rank, size = want
    local_shape = spec.local_shape(shape, size)
    if want in saved:                           # the same piece was saved: flat ranges map one to one
        pieces = {saved.index(want): [(0, 0, math.prod(local_shape))]}
        wanted = [(0, start, end - start)]
    else:
        dim, runs = axis_runs(spec, shape, rank, size)
        sdim = axis_runs(*saved[0])[0]
        by_local = [(g, local, n) for local, g, n in flat_blocks(dim, runs, local_shape, shape)]
        # (offset in the target, global flat start, length), sorted by both
        wanted = [(t, g, n) for g, t, n in intersect(by_local, [(0, start, end - start)])]
        if rows is not None:
            wanted = clip(wanted, rows * math.prod(shape[1:]))
        pieces = {}
        for i, runs_i in enumerate(_saved_runs(saved, sdim, rank)):
            s_spec, s_shape, _, s_size = saved[i]
            pieces[i] = flat_blocks(sdim, runs_i, s_spec.local_shape(s_shape, s_size), s_shape)
    reads = []
    for i, blocks in pieces.items():
        for src, dst, n in intersect(blocks, wanted):                     # src: the saved local flat index
            for file, lo, hi in shards[i]:
                a, z = max(src, lo), min(src + n, hi)
                if a < z:
                    reads.append((file, a, dst + a - src, z - a))
    return reads, sum(n for *_, n in wanted)
