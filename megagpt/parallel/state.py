"""ParallelState: every process group of a run, generated from one order string.

The world is a grid with one axis per parallel dimension. The order string ("tp-cp-ep-dp-pp")
lists the axes from fastest- to slowest-varying rank, so TP ranks are adjacent and share a node.
A group along axis X is the set of ranks that differ only in their X coordinate; the grid is
`layout.rank_grid`, the same rule that gives `Layout.rank_coords`.

Expert parallelism is carved out of dp (layout.py): with ep > 1 the order's dp axis is the
expert-data-parallel axis (size dp/ep); the "dp" group, over which dense gradients are reduced, is
the product of the ep and edp axes. The "edp" group holds an expert's replicas: that axis times cp
(parameters are replicated over CP), as Megatron-Core's edp. With ep = 1, edp is dp (dp_cp).

The object is handed to whatever needs it (nanotron style); there are no module globals.
Each group is wrapped in `Group`, which runs the collectives, short-circuits when the group
has one rank (so a single-process run needs no torch.distributed at all), and records the
bytes it moves in a `CommCounter` for the accounting tests.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..layout import AXES, rank_grid  # noqa: F401  (rank_grid: the order string's grid, re-exported)

class CommCounter:
    """Bytes moved per (kind, group name). `bytes` is what the caller handed to the collective."""

    def __init__(self):
        self.records: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.enabled = True

    def add(self, kind: str, group: str, nbytes: int):
        if self.enabled:
            self.records[(kind, group)] += nbytes
            self.calls[(kind, group)] += 1

    def reset(self):
        self.records.clear()
        self.calls.clear()

    def summary(self) -> dict[str, int]:
        return {f"{group}/{kind}": n for (kind, group), n in sorted(self.records.items())}


def sp_reduce_kind(backend: str) -> str:
    """How a TP reduce-scatter of activations (sequence parallelism) runs on a backend: gloo has no
    ring reduce-scatter worth the name, and an all-reduce + this rank's slice is faster there ([256, 2,
    256] fp32 on 2 ranks: 0.81 ms against 1.19 ms); NCCL's reduce-scatter moves half the bytes."""
    return "all_reduce" if backend == "gloo" else "reduce_scatter"


def _all_gather_single():
    """dist.all_gather_single: the name torch 2.13 uses (all_gather_into_tensor warns it is deprecated);
    the old name where the new one is absent. Looked up at each call, so a test that patches dist sees it."""
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _reduce_scatter_single():
    """dist.reduce_scatter_single, likewise the newer name of reduce_scatter_tensor."""
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Group:
    """One process group as seen from this rank."""
    name: str
    ranks: list[int]
    rank: int                         # this process's index inside the group
    pg: object = None                 # torch ProcessGroup, None when size == 1
    counter: CommCounter | None = None
    sp_reduce: str = "reduce_scatter"  # sp_reduce_kind(this group's backend): how reduce_scatter() runs

    @property
    def size(self) -> int:
        return len(self.ranks)

    def _count(self, kind, t):
        if self.counter is not None and self.size > 1:
            self.counter.add(kind, self.name, t.numel() * t.element_size())

    # The collectives: in place where torch is in place, always returning the result.
    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.size == 1:
            return t
        self._count("all_reduce", t)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.pg)
        return t

    def all_reduce_coalesced(self, tensors: list[torch.Tensor]) -> None:
        """Sum each of `tensors` over the group in place, through one all-reduce of them all, flattened."""
        if self.size == 1 or not tensors:
            return
        flat = self.all_reduce(torch.cat([t.reshape(-1) for t in tensors]))
        for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(piece.view_as(t))

    def all_gather(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """[.., n, ..] on each rank -> [.., size*n, ..], rank order along `dim`."""
        if self.size == 1:
            return t
        self._count("all_gather", t)
        t = t.movedim(dim, 0).contiguous()
        out = torch.empty((self.size * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        _all_gather_single()(out, t, group=self.pg)
        return out.movedim(0, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """[.., size*n, ..] summed over ranks, each rank keeping its n along `dim`."""
        if self.size == 1:
            return t
        # gloo aborts every rank, uncatchably, on a shape mismatch: check first.
        if t.shape[dim] % self.size:
            raise ValueError(f"reduce_scatter on group {self.name}: dim {dim} of shape {tuple(t.shape)} "
                             f"is not divisible by the group size {self.size}")
        if self.sp_reduce == "all_reduce":   # the sum everywhere, this rank keeps its slice
            full = self.all_reduce(t.movedim(dim, 0).clone(memory_format=torch.contiguous_format))
            n = full.shape[0] // self.size
            return full[self.rank * n:(self.rank + 1) * n].movedim(0, dim)
        self._count("reduce_scatter", t)
        t = t.movedim(dim, 0).contiguous()
        out = torch.empty((t.shape[0] // self.size,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        _reduce_scatter_single()(out, t, group=self.pg)
        return out.movedim(0, dim)

    # Asynchronous forms for the DP gradient buckets: they return the work handle (None when
    # the group has one rank), and the caller waits on it before reading the result.
    def all_reduce_async(self, t: torch.Tensor):
        """Start an in-place sum of t over the group."""
        if self.size == 1:
            return None
        self._count("all_reduce", t)
        return dist.all_reduce(t, group=self.pg, async_op=True)

    def reduce_scatter_async(self, out: torch.Tensor, t: torch.Tensor):
        """Start a sum of flat t [size*n] over the group into out [n] (out may alias t's own slice)."""
        if out.numel() * self.size != t.numel():  # gloo aborts uncatchably on a mismatch: check first
            raise ValueError(f"reduce_scatter on group {self.name}: input of {t.numel()} elements is not "
                             f"{self.size} x output of {out.numel()}")
        if self.size == 1:
            if out.data_ptr() != t.data_ptr():
                out.copy_(t)
            return None
        self._count("reduce_scatter", t)
        return _reduce_scatter_single()(out, t, group=self.pg, async_op=True)

    def all_gather_async(self, out: torch.Tensor, t: torch.Tensor):
        """Start a gather of flat t [n] from every rank into out [size*n], rank order (t may be
        out's own slice [rank*n, (rank+1)*n): in place). Counted like all_gather."""
        if out.numel() != t.numel() * self.size:  # gloo aborts uncatchably on a mismatch: check first
            raise ValueError(f"all_gather on group {self.name}: output of {out.numel()} elements is not "
                             f"{self.size} x input of {t.numel()}")
        if self.size == 1:
            if out.data_ptr() != t.data_ptr():
                out.copy_(t)
            return None
        self._count("all_gather", t)
        return _all_gather_single()(out, t, group=self.pg, async_op=True)

    def all_to_all(self, t: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        """Rows [sum(in_splits), ..] -> [sum(out_splits), ..]: in_splits[j] rows go to rank j,
        out_splits[j] rows come from rank j, in rank order. Counted as the bytes handed in."""
        if self.size == 1:
            return t
        self._count("all_to_all", t)
        out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), list(out_splits), list(in_splits), group=self.pg)
        return out

    def broadcast(self, t: torch.Tensor, src_index: int = 0) -> torch.Tensor:
        if self.size == 1:
            return t
        self._count("broadcast", t)
        dist.broadcast(t, src=self.ranks[src_index], group=self.pg)
        return t


class ParallelState:
    """All groups of one run. Build with `ParallelState.create(...)` after init_process_group,
    or `ParallelState.single()` for a plain one-process run."""

    def __init__(self, world_size: int, rank: int, sizes: dict[str, int], order: str, groups: dict[str, Group],
                 counter: CommCounter, device: torch.device, embedding: Group | None = None):
        self.world_size, self.rank, self.sizes, self.order = world_size, rank, sizes, order
        self.groups, self.counter, self.device = groups, counter, device
        self.embedding = embedding or Group("embedding", [rank], 0, None, counter)
        # the whole world is torch.distributed's default group (pg None)
        self.world = Group("world", list(range(world_size)), rank, None, counter)

    # -- construction
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelState":
        counter = CommCounter()
        groups = {a: Group(a, [0], 0, None, counter) for a in AXES}
        groups["mp"] = Group("mp", [0], 0, None, counter)
        groups["dp_cp"] = groups["dp"]
        groups["edp"] = groups["dp"]
        return cls(1, 0, {a: 1 for a in AXES}, "-".join(AXES), groups, counter, torch.device(device))

    @classmethod
    def virtual(cls, tp: int = 1, pp: int = 1, dp: int = 1, tp_rank: int = 0, pp_rank: int = 0,
                dp_rank: int = 0, cp: int = 1, cp_rank: int = 0, ep: int = 1, ep_rank: int = 0) -> "ParallelState":
        """A rank of a layout without any process group: to build a model on the meta device and
        count what one rank would hold (dry runs, planning, the converter). Collectives cannot run on it.
        With ep > 1 and dp a multiple of ep, the edp group is dp/ep ranks (this rank at dp_rank // ep)."""
        counter = CommCounter()
        sizes = {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp}
        coords = {"tp": tp_rank, "cp": cp_rank, "ep": ep_rank, "dp": dp_rank, "pp": pp_rank}
        groups = {a: Group(a, list(range(sizes[a])), coords[a], None, counter) for a in AXES}
        groups["mp"] = Group("mp", list(range(tp * cp * pp)), (pp_rank * cp + cp_rank) * tp + tp_rank, None, counter)
        groups["dp_cp"] = groups["dp"] if cp == 1 else \
            Group("dp_cp", list(range(dp * cp)), dp_rank * cp + cp_rank, None, counter)
        groups["edp"] = groups["dp_cp"] if ep == 1 or dp % ep else \
            Group("edp", list(range(dp // ep * cp)), dp_rank // ep * cp + cp_rank, None, counter)
        return cls(tp * cp * pp * dp, 0, sizes, "-".join(AXES), groups, counter, torch.device("meta"))

    @classmethod
    def create(cls, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, order: str = "tp-cp-ep-dp-pp",
               device: str | torch.device | None = None) -> "ParallelState":
        """Every rank must call this, in the same order: dist.new_group is collective."""
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % (tp * pp * cp * ep):
            raise ValueError(f"parallel layout: world size {world} is not divisible by "
                             f"tp*pp*cp*ep={tp}*{pp}*{cp}*{ep}")
        edp = world // (tp * pp * cp * ep)
        sizes = {"tp": tp, "cp": cp, "ep": ep, "dp": edp, "pp": pp}    # the grid: its dp axis is edp
        grid = rank_grid(world, sizes, order)
        counter = CommCounter()
        groups = {}
        for axis in AXES:
            if axis == "dp":   # dense weights: every rank holding the same piece, ep x edp
                groups["edp"] = cls._make("edp" if ep > 1 else "dp", grid["dp"], rank, counter)
                groups["dp"] = cls._make("dp", _merge(grid, ["ep", "dp"], world), rank, counter) \
                    if ep > 1 else groups["edp"]
            else:
                groups[axis] = cls._make(axis, grid[axis], rank, counter)
        sizes["dp"] = edp * ep
        # model-parallel group (tp x cp x pp): ranks holding pieces of one model replica
        mp_groups = _merge(grid, ["tp", "cp", "pp"], world)
        groups["mp"] = cls._make("mp", mp_groups, rank, counter)
        # dp x cp: the ranks holding the same parameters (replicated over CP), which reduce gradients
        # and shard the distributed optimizer between them (the dp group itself when cp = 1); dp is ep x edp
        groups["dp_cp"] = groups["dp"] if cp == 1 else cls._make("dp_cp", _merge(grid, ["ep", "dp", "cp"], world),
                                                                  rank, counter)
        if cp > 1:   # an expert is replicated over CP too: its replicas are edp x cp (the dp x cp ones if ep = 1)
            groups["edp"] = groups["dp_cp"] if ep == 1 else cls._make("edp", _merge(grid, ["dp", "cp"], world),
                                                                      rank, counter)
        # first and last pipeline stage share the word embedding when it is tied
        emb_groups = [sorted({g[0], g[-1]}) for g in grid["pp"]]
        embedding = cls._make("embedding", emb_groups, rank, counter)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
        return cls(world, rank, sizes, order, groups, counter, torch.device(device), embedding)

    @staticmethod
    def _make(name, rank_lists, rank, counter) -> Group:
        mine = None
        for ranks in rank_lists:
            pg = dist.new_group(ranks) if len(ranks) > 1 else None  # collective: every rank calls it
            if rank in ranks:
                mine = Group(name, list(ranks), ranks.index(rank), pg, counter,
                             sp_reduce_kind(dist.get_backend(pg)) if pg is not None and name == "tp"  # SP only
                             else "reduce_scatter")
        if mine is None:  # a rank that is in none of the lists (cannot happen for grid axes)
            mine = Group(name, [rank], 0, None, counter)
        return mine

    # -- convenience
    @property
    def tp(self) -> Group: return self.groups["tp"]
    @property
    def pp(self) -> Group: return self.groups["pp"]
    @property
    def dp(self) -> Group: return self.groups["dp"]
    @property
    def mp(self) -> Group: return self.groups["mp"]
    @property
    def cp(self) -> Group: return self.groups["cp"]
    @property
    def dp_cp(self) -> Group: return self.groups["dp_cp"]
    @property
    def ep(self) -> Group: return self.groups["ep"]
    @property
    def edp(self) -> Group: return self.groups["edp"]

    @property
    def is_first_stage(self) -> bool: return self.pp.rank == 0
    @property
    def is_last_stage(self) -> bool: return self.pp.rank == self.pp.size - 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp.rank}/{self.tp.size} "
                f"cp {self.cp.rank}/{self.cp.size} pp {self.pp.rank}/{self.pp.size} dp {self.dp.rank}/{self.dp.size}")


def _merge(grid, axes, world) -> list[list[int]]:
    """Groups spanning several axes: ranks connected through any of the given axes."""
    parent = list(range(world))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a in axes:
        for g in grid[a]:
            for r in g[1:]:
                parent[find(r)] = find(g[0])
    comps = defaultdict(list)
    for r in range(world):
        comps[find(r)].append(r)
    return sorted(comps.values())


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Start torch.distributed from the launcher's environment (torchrun sets RANK, WORLD_SIZE, ...).

    The backend is nccl when CUDA is present and gloo otherwise, picked here at start-up.
    """
    import datetime
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" not in os.environ:  # plain `python script.py`: a world of one
        from .spawn import free_port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
