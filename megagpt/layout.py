"""The parallel layout of a run: a pure value that every tool reads, and its one set of rules.

    layout = Layout.from_config(cfg, world_size)     # validated: a ConfigError names the config field
    layout.num_microbatches, layout.chunk_layers(cfg.model), layout.activation_shape(cfg.model)

What it holds: the degrees tp, cp, ep, pp, vp (model chunks per pp rank) and the world size,
hence dp; sp (sequence parallelism, only ever on with tp > 1); the order string that lays the
ranks out on the world grid ("tp-cp-ep-dp-pp": tp varies fastest); the batch shape (sequence
length, micro batch and global batch, hence the microbatches per step on one pipeline); an
explicit layer split if the config gives one, and the pipeline schedule. `validate` is the one
set of rules; a Layout built by hand is checked by calling it, one built by `from_config` is
checked already. The model builder, the pipeline
engine, the memory and communication models, the planner, the dry run and the converter all read
it, so they agree on which layers each chunk holds, how many microbatches run and what crosses a
stage boundary.

dp counts the ranks that hold the same model piece: dp = world / (tp * cp * pp). Context
parallelism (cp) cuts every sequence into 2*cp zigzag chunks (parallel/context.py), so a rank holds
seq_len/cp tokens, and parameters are replicated over cp: gradients are reduced, and the
distributed optimizer sharded, over dp*cp.

Expert parallelism is carved out of dp, as Megatron-Core does (its expert grid: etp-ep-edp-pp).
The dense weights are replicated over all dp ranks; the experts of a MoE layer are split over ep
of them, so each expert lives on dp/ep ranks: the expert-data-parallel (edp) group, over which
its gradients are reduced and its optimizer state sharded. On the world grid the order string's
"dp" axis is then edp (size dp/ep), and the DP group is the product of the ep and edp axes
(`grid_sizes`, `rank_coords`). Under CP an expert is also replicated over the cp ranks: its
gradients reduce (and its ZeRO shards spread) over edp x cp, Megatron-Core's edp; here ep must
divide dp (Megatron-Core allows dp*cp). MoE routing statistics and capacity drops are reduced over
CP (model/moe.py); mixture of depths is refused with cp > 1 (its top-k needs the whole sequence).
Expert weights are whole on every TP rank (expert TP = 1).

The layer split (`chunk_layers`). The model is cut into pp*vp chunks of consecutive layers; global
chunk c lives on pp rank c % pp as local chunk c // pp (the layout of `pipeline/schedule.py`).
Without an explicit `parallel.layers_per_stage`, each chunk's cost is counted in layer-equivalents
of forward FLOPs per token (backward is ~2x forward for every part, so the ratio holds for
training): a layer is `model_size.layer_flops`; the LM head on the last chunk is 2*h*V_padded (about
V/(12h) of a layer for an MHA 4h-MLP model: 0.6 for the 70B flagship, several layers for a tiny
model with a big vocab); the embedding is a row gather and costs 0. The split minimises the most
expensive chunk, with at least one layer per chunk. Among the splits that reach that minimum,
spare layers are taken from the most expensive chunk first, from the first chunk on ties: under
1F1B rank 0 holds the most microbatches in flight, so a lighter first stage also lowers the peak
activation memory. For the 70B flagship (70 layers, pp=4) this gives 17, 18, 18, 17.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

from .config import Config, ConfigError, ModelConfig
from .model_size import layer_flops

AXES = ("tp", "cp", "ep", "dp", "pp")
SCHEDULES = ("gpipe", "1f1b", "interleaved")   # interleaved = 1f1b over vp > 1 chunks (1f1b itself when vp = 1)


def _positive_ints(*named) -> None:
    for name, value in named:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    ep: int = 1
    pp: int = 1
    vp: int = 1
    world_size: int = 1
    sp: bool = False
    order: str = "tp-cp-ep-dp-pp"
    seq_len: int = 2048
    micro_batch: int = 1
    global_batch: int = 1                  # sequences per optimizer step, over all dp replicas
    layers_per_stage: tuple | None = None  # explicit split: one count per global chunk
    schedule: str = "1f1b"

    def __post_init__(self):
        if self.sp and self.tp == 1:       # nothing to shard over (as Megatron, SP is off for tp = 1)
            object.__setattr__(self, "sp", False)
        if self.layers_per_stage is not None:
            object.__setattr__(self, "layers_per_stage", tuple(self.layers_per_stage))

    @classmethod
    def from_config(cls, cfg: Config, world_size: int | None = None, schedule: str | None = None) -> "Layout":
        """The run's layout, validated against cfg.model. world_size: the launcher's, else
        parallel.world_size, else one model replica (dp = 1; dp = ep with experts). schedule: the engine's schedule kind
        when it overrides train.schedule."""
        p, t = cfg.parallel, cfg.train
        world = next(w for w in (world_size, p.world_size, p.tp * p.cp * p.pp * p.ep) if w is not None)
        layout = cls(tp=p.tp, cp=p.cp, ep=p.ep, pp=p.pp, vp=p.vp, world_size=world, sp=p.sequence_parallel,
                     order=p.order, seq_len=t.seq_len, micro_batch=t.micro_batch_size,
                     global_batch=t.global_batch_size, layers_per_stage=p.layers_per_stage,
                     schedule=schedule or t.schedule)
        layout.validate(cfg.model)
        return layout

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ the rules
    def validate(self, m: ModelConfig) -> None:
        """Every rule a layout must meet to be built and run, as one-line ConfigErrors naming the
        config field; the config loader, the engine, the builder and the planner all call this one."""
        _positive_ints(("parallel.tp", self.tp), ("parallel.cp", self.cp), ("parallel.ep", self.ep),
                       ("parallel.pp", self.pp), ("parallel.vp", self.vp), ("parallel.world_size", self.world_size),
                       ("train.seq_len", self.seq_len), ("train.micro_batch_size", self.micro_batch),
                       ("train.global_batch_size", self.global_batch))
        self._validate_ep(m)
        if sorted(self.order.split("-")) != sorted(AXES):
            raise ConfigError(f"parallel.order: expected a permutation of tp-cp-ep-dp-pp, got {self.order!r}")
        tp = self.tp
        if m.num_heads % tp:
            raise ConfigError(f"model.num_heads: {m.num_heads} is not divisible by parallel.tp={tp}")
        if m.kv_heads % tp and tp % m.kv_heads:
            raise ConfigError(f"model.num_kv_heads: {m.kv_heads} KV heads can be neither split nor replicated "
                              f"over parallel.tp={tp}")
        if m.ffn_hidden_size % tp:
            raise ConfigError(f"model.ffn_hidden_size: {m.ffn_hidden_size} is not divisible by parallel.tp={tp}")
        if self.world_size % self.model_parallel:
            raise ConfigError(f"parallel.world_size: {self.world_size} is not divisible by tp*cp*pp="
                              f"{tp}*{self.cp}*{self.pp}={self.model_parallel}")
        if self.vp > 1 and self.pp == 1:
            raise ConfigError("parallel.vp: virtual stages need parallel.pp > 1")
        chunks = self.pp * self.vp
        counts = self.layers_per_stage
        if counts is not None:
            if len(counts) != chunks or any(not isinstance(n, int) or n < 0 for n in counts):
                raise ConfigError(f"parallel.layers_per_stage: expected {chunks} non-negative integers (pp*vp), "
                                  f"got {list(counts)}")
            if sum(counts) != m.num_layers:
                raise ConfigError(f"parallel.layers_per_stage: sums to {sum(counts)}, "
                                  f"but model.num_layers={m.num_layers}")
        elif m.num_layers < chunks:  # uneven splits are fine (they are balanced); empty chunks are not
            raise ConfigError(f"parallel.pp: {m.num_layers} layers are fewer than pp*vp={chunks} chunks "
                              f"(pp={self.pp}, vp={self.vp})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule == "gpipe" and self.vp > 1:
            raise ConfigError("train.schedule: gpipe has no interleaved variant; use 1f1b with parallel.vp > 1")
        cp = self.cp
        if cp > 1 and self.seq_len % (2 * cp):
            raise ConfigError(f"train.seq_len: {self.seq_len} is not divisible by 2*parallel.cp={2 * cp} "
                              f"(context parallelism cuts it into 2*cp zigzag chunks)")
        if cp > 1 and m.attention_dropout > 0:            # ring attention has no dropout
            raise ConfigError(f"model.attention_dropout: attention dropout is not supported with parallel.cp={cp} "
                              f"> 1 (got {m.attention_dropout}); set it to 0")
        if cp > 1 and m.hidden_dropout > 0 and self.sp:   # SP shards draw per TP rank, which CP ranks would share
            raise ConfigError(f"model.hidden_dropout: hidden dropout with parallel.cp={cp} needs "
                              f"parallel.sequence_parallel off (got {m.hidden_dropout}); set it to 0 or turn SP off")
        if cp > 1:
            _check_cp_method(m, cp)
        if cp > 1 and m.mod_layers:   # its top-k over the sequence would need the whole sequence on each rank
            raise ConfigError(f"parallel.cp: mixture of depths (model.mod_layers) is not supported with "
                              f"parallel.cp={cp} > 1 (its top-k needs the whole sequence); use cp=1")
        if self.sp and m.mod_layers:
            raise ConfigError("parallel.sequence_parallel: mixture of depths (model.mod_layers) needs the whole "
                              "sequence on each rank; turn sequence parallelism off")
        if self.sp and (self.seq_len // cp) % tp:
            raise ConfigError(f"train.seq_len: {self.seq_len}/cp={self.seq_len // cp} is not divisible by "
                              f"parallel.tp={tp} (sequence parallel)")
        if self.global_batch % (self.micro_batch * self.dp):
            raise ConfigError(f"train.global_batch_size: {self.global_batch} is not divisible by "
                              f"micro_batch_size*dp={self.micro_batch}*{self.dp}")
        if self.pp > 1 and self.num_microbatches < self.pp:
            raise ConfigError(f"train.global_batch_size: gives {self.num_microbatches} microbatches per pipeline, "
                              f"fewer than parallel.pp={self.pp}")

    def _validate_ep(self, m: ModelConfig) -> None:
        if self.ep == 1:
            return
        if m.moe_num_experts < 1:
            raise ConfigError(f"parallel.ep: expert parallelism needs model.moe_num_experts > 0 (got ep={self.ep})")
        if m.moe_num_experts % self.ep:
            raise ConfigError(f"parallel.ep: {self.ep} does not divide model.moe_num_experts={m.moe_num_experts}")
        if self.world_size % self.model_parallel or self.dp % self.ep:
            raise ConfigError(f"parallel.ep: {self.ep} does not divide dp={self.world_size / self.model_parallel:g} "
                              f"(world {self.world_size} / tp*cp*pp={self.model_parallel}); experts are carved out of dp")

    # ------------------------------------------------------------------ derived figures
    @property
    def seq_multiple(self) -> int:
        """What every sequence length must be a multiple of: 2*cp zigzag chunks, each cut by tp under SP."""
        return (2 * self.cp if self.cp > 1 else 1) * (self.tp if self.sp else 1)
    @property
    def model_parallel(self) -> int:
        """Ranks that hold one model replica between them."""
        return self.tp * self.cp * self.pp

    @property
    def dp(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def num_microbatches(self) -> int:
        """Microbatches per optimizer step on one pipeline."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "cp": self.cp, "ep": self.ep, "dp": self.dp, "pp": self.pp}

    @property
    def grid_sizes(self) -> dict[str, int]:
        """The world grid's axes: the order's dp axis is edp = dp/ep (module docstring)."""
        return self.sizes | {"dp": self.dp // self.ep}

    def rank_coords(self, rank: int) -> dict[str, int]:
        """{axis: coordinate} of a global rank on the grid the order string lays out; with ep > 1,
        "edp" is its grid dp coordinate and "dp" its index in the DP group (ep x edp, rank order)."""
        sizes, strides = self.grid_sizes, _strides(self.grid_sizes, self.order)
        coords = {axis: rank // stride % sizes[axis] for axis, stride in strides.items()}
        coords["edp"] = coords["dp"]
        if strides["ep"] < strides["dp"]:
            coords["dp"] = coords["ep"] + self.ep * coords["edp"]
        else:
            coords["dp"] = coords["edp"] + sizes["dp"] * coords["ep"]
        return coords

    def activation_shape(self, m: ModelConfig) -> tuple[int, int, int]:
        """What crosses a pipeline stage boundary: [s/(cp*tp), b, h] with sequence parallelism, else [s/cp, b, h]."""
        s = self.seq_len // self.cp
        return (s // self.tp if self.sp else s, self.micro_batch, m.hidden_size)

    def head_cost(self, m: ModelConfig) -> float:
        """Forward FLOPs of the LM head per token, in layers (see the module docstring)."""
        return 2 * m.hidden_size * m.padded_vocab(self.tp) / sum(layer_flops(m, self.seq_len))

    def chunk_layers(self, m: ModelConfig) -> list[list[int]]:
        """Global layer ids of each of the pp*vp global chunks, in order (the explicit split, else
        the balanced one)."""
        chunks = self.pp * self.vp
        if self.layers_per_stage is not None:
            counts = list(self.layers_per_stage)
        else:
            counts = balanced_counts(m.num_layers, [0.0] * (chunks - 1) + [self.head_cost(m)])
        starts = list(itertools.accumulate(counts, initial=0))
        return [list(range(a, b)) for a, b in zip(starts, starts[1:])]

    def all_chunks(self, m: ModelConfig) -> list[tuple[int, list[int], bool, bool]]:
        """(pp rank, layer ids, pre_process, post_process) of every global chunk, in order: global
        chunk c lives on pp rank c % pp; the first holds the embedding, the last the LM head."""
        layers, last = self.chunk_layers(m), self.pp * self.vp - 1
        return [(c % self.pp, ids, c == 0, c == last) for c, ids in enumerate(layers)]

    def stage_chunks(self, m: ModelConfig, pp_rank: int) -> list[tuple[list[int], bool, bool]]:
        """(layer ids, pre_process, post_process) of each local chunk of pipeline rank pp_rank."""
        return [(ids, pre, post) for rank, ids, pre, post in self.all_chunks(m) if rank == pp_rank]

    def stage_layers(self, m: ModelConfig) -> list[int]:
        """Transformer layers held by each pp rank (summed over its vp chunks)."""
        out = [0] * self.pp
        for rank, ids, _, _ in self.all_chunks(m):
            out[rank] += len(ids)
        return out


def _check_cp_method(m: ModelConfig, cp: int) -> None:
    """Which CP method serves which mask: "ring" causal and sliding-window masks (a window is skipped per
    block, never dropped), "allgather" every mask (causal, window, workspace tokens, adaptive span)."""
    from .model.variants import cp_method
    for on, field, what in ((m.workspace_tokens, "model.workspace_tokens", "workspace mask"),
                            (m.adaptive_span, "model.adaptive_span", "adaptive span's ramp")):
        if on and cp_method(m) == "ring":
            raise ConfigError(f"{field}: the ring serves causal and window masks only, not the {what}; set "
                              f"model.cp_attention=allgather (or auto) with parallel.cp={cp}")


def balanced_counts(num_layers: int, extra: list[float]) -> list[int]:
    """Layers per chunk minimising max(layers + extra) over chunks, each chunk getting >= 1 layer."""
    return list(_balanced_counts(num_layers, tuple(extra)))


@functools.lru_cache(maxsize=4096)   # the planner asks for the same few splits thousands of times
def _balanced_counts(num_layers: int, extra: tuple[float, ...]) -> tuple[int, ...]:
    chunks = len(extra)
    if num_layers < chunks:
        raise ConfigError(f"parallel.pp: {num_layers} layers are fewer than pp*vp={chunks} chunks")

    def capacity(cap: float) -> list[int]:  # the most layers each chunk takes without costing more than cap
        return [math.floor(cap - e + 1e-9) for e in extra]

    # the optimal cap is some chunk's cost n + e; capacity grows with cap, so bisect the candidates
    floor = max(1 + e for e in extra)
    caps = sorted({n + e for e in set(extra) for n in range(1, num_layers + 1) if n + e >= floor - 1e-9})
    lo, hi = 0, len(caps) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(capacity(caps[mid])) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    counts = capacity(caps[lo])
    while sum(counts) > num_layers:  # spare layers: from the costliest chunk, the first one on ties
        c = max((c for c in range(chunks) if counts[c] > 1), key=lambda c: (counts[c] + extra[c], -c))
        counts[c] -= 1
    return tuple(counts)


def _strides(sizes: dict[str, int], order: str) -> dict[str, int]:
    out, stride = {}, 1
    for axis in order.split("-"):
        out[axis] = stride
        stride *= sizes.get(axis, 1)
    return out


def rank_grid(world_size: int, sizes: dict[str, int], order: str) -> dict[str, list[list[int]]]:
    """For each axis, the rank groups along it: the ranks that differ only in that coordinate.

    rank = sum_i coord[axis_i] * stride_i, with strides growing in `order`'s order (the first axis
    varies fastest, so TP ranks are adjacent and share a node)."""
    axes = order.split("-")
    product = math.prod(sizes.get(a, 1) for a in axes)
    if product != world_size:
        raise ValueError(f"parallel layout: {'*'.join(f'{a}{sizes.get(a, 1)}' for a in axes)} = {product} "
                         f"ranks, but the world size is {world_size}")
    strides = _strides(sizes, order)
    groups = {}
    for axis in axes:
        others = [a for a in axes if a != axis]
        out = []
        for coords in itertools.product(*(range(sizes.get(a, 1)) for a in others)):
            base = sum(c * strides[a] for a, c in zip(others, coords))
            out.append([base + i * strides[axis] for i in range(sizes.get(axis, 1))])
        groups[axis] = sorted(out)
    return groups
