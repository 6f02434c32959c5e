"""The sharded checkpoint's rank files: their schema, and the one Writer and one Reader of them.

Per rank, in a step directory (the directory protocol is store.py's):
  rank_XXXXX.safetensors   params under their global names, as this rank holds them (its TP piece;
                           an expert weight's EP piece: `piece_of`);
                           optimizer state under `optim/<name>/<key>`, flat, this rank's DP range of it
  rank_XXXXX.json          a RankMeta: per tensor a TensorEntry (global shape, dtype, TP piece), per
                           optimizer entry an OptimEntry (its flat range), the layout, the model config,
                           the run config, the optimizer's scalars and `extra` (JSON; tensors encoded)
save_checkpoint and the converter write through Writer; load_checkpoint and the converter read
through Reader, which takes slices: a rank pulls only the rows and columns of each saved piece that
its own piece needs (regions.py does the index arithmetic), and counts the bytes it pulled.
Only safetensors and JSON are read: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..parallel.layers import ShardSpec, meta_of
from . import regions
from .st_writer import SafetensorsWriter
from .store import FORMAT, CheckpointError, inside, rank_file, read_json, read_manifest, verify_file, write_json

# Fields that fix the tensors' shapes or meaning: a checkpoint loads only into a model that agrees on
# all of them. Others (dropout, rope_scaling for context extension, max_seq_len, ...) may change.
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_hidden_size", "mlp",
               "norm", "bias", "tie_embeddings", "rotary_fraction", "rope_interleaved")
VOCAB_PADDED = ("embedding.weight", "lm_head.weight")     # dim 0 is the padded vocab


# ----------------------------------------------------------------------------- the schema

@dataclasses.dataclass
class TPPiece:
    """Which TP piece of the global tensor a rank holds: its ShardSpec, and its coordinate on it."""
    dim: int | None
    parts: list
    rank: int
    size: int

    @classmethod
    def of(cls, spec: ShardSpec, rank: int, size: int) -> "TPPiece":
        return cls(spec.dim, [list(part) for part in spec.parts], rank, size)

    @property
    def spec(self) -> ShardSpec:
        return ShardSpec(self.dim, tuple(tuple(part) for part in self.parts))


@dataclasses.dataclass
class TensorEntry:
    global_shape: list
    dtype: str
    tp: TPPiece
    vocab_rows: int | None = None      # the unpadded vocab, for VOCAB_PADDED tensors only


@dataclasses.dataclass
class OptimEntry:
    start: int                         # this file's flat range [start, end) of the TP piece
    end: int
    keys: list
    global_shape: list
    tp: TPPiece
    vocab_rows: int | None = None


@dataclasses.dataclass
class RankMeta:
    format: str
    step: int
    rank: int
    world_size: int
    layout: dict                       # order, tp, pp, dp, tp_rank, pp_rank, dp_rank
    model_config: dict
    config: dict | None
    tensors: dict                      # name -> TensorEntry
    optim: dict                        # name -> OptimEntry
    optim_scalars: dict                # encoded (encode_json)
    extra: dict                        # encoded (encode_json)
    tensor_file: dict                  # {"size", "sha256"} of the rank's safetensors file

    def to_json(self) -> dict:
        def entry(e):
            return {k: v for k, v in dataclasses.asdict(e).items() if not (k == "vocab_rows" and v is None)}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**out, "tensors": {n: entry(e) for n, e in self.tensors.items()},
                "optim": {n: entry(e) for n, e in self.optim.items()}}

    @classmethod
    def from_json(cls, d, where: str) -> "RankMeta":
        try:
            if not isinstance(d, dict):
                raise TypeError("not an object")
            fields = {f.name: d[f.name] for f in dataclasses.fields(cls)}
            fields["tensors"] = {n: TensorEntry(**{**e, "tp": TPPiece(**e["tp"])}) for n, e in d["tensors"].items()}
            fields["optim"] = {n: OptimEntry(**{**e, "tp": TPPiece(**e["tp"])}) for n, e in d["optim"].items()}
        except KeyError as e:
            raise CheckpointError(f"{where}: field {e.args[0]} is missing") from None
        except (TypeError, AttributeError) as e:
            raise CheckpointError(f"{where}: malformed rank metadata ({e})") from None
        return cls(**fields)


def piece_of(meta, ps) -> tuple[ShardSpec, int, int]:
    """(ShardSpec, rank, size) of the piece of a parameter's global tensor a rank holds, as the files
    record it (TPPiece): its TP piece; for an expert weight (ParamMeta.expert: whole over TP, its
    experts split over ep along dim 0) its EP piece. So a checkpoint saved at one ep loads at any."""
    if meta.expert:
        return ShardSpec(0, ((meta.global_shape[0], 0),)), ps.groups["ep"].rank, ps.groups["ep"].size
    return meta.spec, ps.tp.rank, ps.tp.size


def layout_of(ps, order: str | None = None) -> dict:
    """The layout fields of a rank's metadata, from its ParallelState (a virtual one included, with
    the run's `order`: a virtual state has the default one)."""
    axes = ("tp", "pp", "dp")
    return {"order": order or ps.order, **{a: ps.groups[a].size for a in axes},
            **{f"{a}_rank": ps.groups[a].rank for a in axes}}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_json(obj, where: str):
    """JSON-able copy of `extra`: tensors (RNG states) become {"__tensor__": dtype, "shape", "data"}."""
    if torch.is_tensor(obj):
        return {"__tensor__": dtype_name(obj.dtype), "shape": list(obj.shape),
                "data": obj.detach().cpu().reshape(-1).tolist()}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise CheckpointError(f"{where}: dict keys must be strings to be stored as JSON")
        return {k: encode_json(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint (JSON or tensors only)")


def decode_json(obj):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["data"], dtype=getattr(torch, obj["__tensor__"])).reshape(obj["shape"])
        return {k: decode_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json(v) for v in obj]
    return obj


# buffers that are model state a resume needs, saved and loaded (and resharded) like replicated
# parameters: the MoE selection bias of auxiliary-loss-free balancing (model/moe.py), moved every step
STATE_BUFFERS = ("selection_bias",)


def rank_params(chunks) -> list[tuple[str, torch.Tensor, bool]]:
    """(global name, param or state buffer, written) for a rank's chunks. With tied embeddings and pp > 1
    the last stage holds a copy of the embedding; the first stage's is written and both are loaded from
    it. Each chunk's STATE_BUFFERS follow its parameters (their meta: meta_of, replicated)."""
    out, seen = [], set()
    for chunk in chunks:
        buffers = [(n, b) for n, b in chunk.named_buffers() if n.rsplit(".", 1)[-1] in STATE_BUFFERS]
        for name, p in [*chunk.named_parameters(), *buffers]:
            copy = meta_of(p).tied_copy
            out.append((name, p, name not in seen and not copy))
            seen.add(name)
    return out


# ----------------------------------------------------------------------------- writing

class Writer:
    """One rank's two files in a step directory being written. Register every tensor first
    (`add_param`, `add_optim`: their metadata, in file order), then `write` (or `write_zeros`) each planned
    tensor in that order, then `close`, which writes the JSON (it records the tensor file's sha256).
    Only the tensor being written is in memory."""

    def __init__(self, directory: str, step: int, rank: int, world_size: int, layout: dict,
                 model_cfg: ModelConfig, config: dict | None):
        self.dir, self.step, self.rank, self.world_size, self.layout = directory, step, rank, world_size, layout
        self.model_cfg, self.config = model_cfg, config
        self.tensors, self.optim, self.plan, self.file = {}, {}, [], None

    def add_param(self, name: str, dtype: torch.dtype, global_shape, tp: TPPiece) -> None:
        rows = self.model_cfg.vocab_size if name in VOCAB_PADDED else None
        self.tensors[name] = TensorEntry(list(global_shape), dtype_name(dtype), tp, rows)
        self.plan.append((name, dtype, tuple(tp.spec.local_shape(tuple(global_shape), tp.size))))

    def add_optim(self, name: str, start: int, end: int, keys, global_shape, tp: TPPiece,
                  dtype: torch.dtype = torch.float32) -> None:
        rows = self.model_cfg.vocab_size if name in VOCAB_PADDED else None
        self.optim[name] = OptimEntry(start, end, list(keys), list(global_shape), tp, rows)
        self.plan += [(f"optim/{name}/{k}", dtype, (end - start,)) for k in keys]

    def _open(self) -> SafetensorsWriter:
        if self.file is None:
            path = os.path.join(self.dir, rank_file(self.rank, "safetensors"))
            self.file = SafetensorsWriter(path, self.plan, {"format": FORMAT})
        return self.file

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._open().write(key, tensor)

    def write_zeros(self, key: str) -> None:
        self._open().write_zeros(key)

    def close(self, optim_scalars, extra) -> RankMeta:
        """optim_scalars, extra: plain values (encoded here) or already encoded dicts (unchanged)."""
        digest = self._open().close()
        meta = RankMeta(FORMAT, self.step, self.rank, self.world_size, self.layout,
                        dataclasses.asdict(self.model_cfg), self.config, self.tensors, self.optim,
                        encode_json(optim_scalars, "optimizer state"), encode_json(extra, "extra"), digest)
        write_json(os.path.join(self.dir, rank_file(self.rank, "json")), meta.to_json())
        return meta


# ----------------------------------------------------------------------------- reading

class Reader:
    """One complete checkpoint: every rank's metadata, and tensors read as slices of the rank files.
    A file is opened (memory-mapped) for one tensor and closed after it, so mapped pages never
    outlive the tensor. `bytes_read` counts the tensor bytes pulled from the files; `bytes_hashed`
    the bytes read to check sha256 (verify=True: each file once, when first opened)."""

    def __init__(self, step_dir: str, verify: bool = True):
        self.dir, self.verify = step_dir, verify
        self.manifest = read_manifest(step_dir)
        self.world = self.manifest["world_size"]
        self.metas: list[RankMeta] = []
        self._files, self._verified = {}, set()
        self.bytes_read = self.bytes_hashed = 0
        self.params: dict[str, dict[int, tuple[int, TensorEntry]]] = {}       # name -> tp rank -> (file, entry)
        self.optim: dict[str, dict[int, list[tuple[int, OptimEntry]]]] = {}   # name -> tp rank -> [(file, entry)]
        for rank in range(self.world):
            name = rank_file(rank, "json")
            self._check(name)
            where = f"{step_dir}/{name}"
            meta = RankMeta.from_json(read_json(inside(step_dir, name, "rank metadata"), where), where)
            if meta.format != FORMAT or meta.rank != rank:
                raise CheckpointError(f"{where}: not the {FORMAT} metadata of rank {rank}")
            self.metas.append(meta)
            for pname, entry in meta.tensors.items():
                self.params.setdefault(pname, {})[entry.tp.rank] = (rank, entry)
            for pname, entry in meta.optim.items():
                self.optim.setdefault(pname, {}).setdefault(entry.tp.rank, []).append((rank, entry))

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmap every open file (each read does; this is for an error midway)."""
        self._files.clear()

    def _check(self, name: str) -> None:
        if self.verify and name not in self._verified:
            verify_file(self.dir, name, self.manifest)
            self.bytes_hashed += self.manifest["files"][name]["size"]
            self._verified.add(name)

    def _slice(self, rank: int, key: str, index):
        """Tensor `key` of a rank file, or (index None) its shape; the file stays open until close()."""
        name = rank_file(rank, "safetensors")
        if rank not in self._files:
            self._check(name)
            try:
                self._files[rank] = safe_open(inside(self.dir, name, "tensor file"), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.dir}/{name}: unreadable safetensors file ({e})") from None
        f = self._files[rank]
        if key not in f.keys():
            raise CheckpointError(f"{self.dir}/{name}: no tensor {key!r}, though its metadata lists it")
        try:
            piece = f.get_slice(key)
            if index is None:
                return tuple(piece.get_shape())
            t = piece[index]
        except SafetensorError as e:
            raise CheckpointError(f"{self.dir}/{name}: cannot read {key!r} ({e})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def check_config(self, cfg: ModelConfig) -> None:
        saved = self.metas[0].model_config
        saved_kv = 1 if saved.get("multi_query") else (saved.get("num_kv_heads") or saved.get("num_heads"))
        for f in ARCH_FIELDS:
            have = saved_kv if f == "kv_heads" else saved.get(f)
            if have != getattr(cfg, f):
                raise CheckpointError(f"model.{f}: the checkpoint in {self.dir} has {have!r}, this model has "
                                      f"{getattr(cfg, f)!r}")

    def _layout(self, name: str, what: str, per_tp: dict, entries: list):
        """(saved pieces [(spec, global shape, tp rank, tp size)], vocab_rows), all TP ranks present."""
        first = entries[0]
        spec, size, shape = first.tp.spec, first.tp.size, tuple(first.global_shape)
        for e in entries[1:]:
            if (e.tp.spec, e.tp.size, tuple(e.global_shape)) != (spec, size, shape):
                raise CheckpointError(f"{name}: rank files disagree on its global shape or TP split ({self.dir})")
        for r in range(size):
            if r not in per_tp:
                raise CheckpointError(f"{name}: the checkpoint in {self.dir} has no {what} for tp rank {r} of {size}")
        return [(spec, shape, r, size) for r in range(size)], first.vocab_rows

    def global_shape(self, name: str) -> tuple:
        per_tp = self.params.get(name)
        if not per_tp:
            raise CheckpointError(f"{name}: not in the checkpoint in {self.dir}")
        return tuple(next(iter(per_tp.values()))[1].global_shape)

    def read_param(self, name: str, global_shape, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
        """tp rank `tp_rank`'s piece (of tp_size) of a parameter of this global shape, whatever layout
        saved it; ShardSpec() with size 1 gives the whole global tensor."""
        per_tp = self.params.get(name)
        if not per_tp:
            raise CheckpointError(f"{name}: not in the checkpoint in {self.dir}")
        saved, vocab = self._layout(name, "shard", per_tp, [e for _, e in per_tp.values()])
        want = (spec, tuple(global_shape), tp_rank, tp_size)
        rows = regions.kept_rows(name, saved[0][1], vocab, want[1])
        reads, volume = regions.box_reads(want, saved, rows)
        dtype = getattr(torch, per_tp[0][1].dtype)
        local_shape = spec.local_shape(want[1], tp_size)
        out = None
        try:
            for i, src, dst in reads:
                expected = saved[i][0].local_shape(saved[i][1], saved[i][3])
                got = self._slice(per_tp[i][0], name, None)
                if got != tuple(expected):
                    raise CheckpointError(f"{name}: the shard of tp rank {i} has shape {got}, expected "
                                          f"{tuple(expected)} (global {saved[i][1]} over tp={saved[i][3]})")
                piece = self._slice(per_tp[i][0], name, src)
                if len(reads) == 1 and tuple(piece.shape) == tuple(local_shape):
                    return piece                                  # one slice is the whole piece
                if out is None:
                    out = torch.zeros(local_shape, dtype=dtype)
                out[dst] = piece
                del piece
        finally:
            self.close()
        if sum(math.prod(s.stop - s.start for s in src) for _, src, _ in reads) != volume:
            raise CheckpointError(f"{name}: the saved shards do not cover tp rank {tp_rank}'s piece ({self.dir})")
        return out if out is not None else torch.zeros(local_shape, dtype=dtype)

    def optim_keys(self, name: str) -> list:
        per_tp = self.optim.get(name)
        if not per_tp:
            raise CheckpointError(f"{name}: no optimizer state in the checkpoint in {self.dir}")
        return list(next(iter(per_tp.values()))[0][1].keys)

    def read_optim(self, name: str, key: str, global_shape, spec: ShardSpec, tp_rank: int, tp_size: int,
                   start: int, end: int) -> torch.Tensor:
        """Flat [start, end) of tp rank `tp_rank`'s piece of one optimizer tensor, fp32, from the DP
        shards of whichever TP pieces hold it."""
        per_tp = self.optim.get(name)
        if not per_tp:
            raise CheckpointError(f"{name}: no optimizer state in the checkpoint in {self.dir}")
        saved, vocab = self._layout(name, f"optimizer {key}", per_tp, [e for es in per_tp.values() for _, e in es])
        want = (spec, tuple(global_shape), tp_rank, tp_size)
        rows = regions.kept_rows(name, saved[0][1], vocab, want[1])
        n = torch.Size(spec.local_shape(want[1], tp_size)).numel()
        if not 0 <= start <= end <= n:
            raise CheckpointError(f"{name}: requested range [{start}, {end}) exceeds its {n} elements")
        shards = []
        for r in range(len(saved)):                  # a range saved twice (a replica) is read once
            cursor, mine = 0, []
            for rank, e in sorted(per_tp[r], key=lambda x: x[1].start):
                if e.end > max(cursor, e.start):
                    mine.append(((rank, e), max(cursor, e.start), e.end))
                    cursor = e.end
            shards.append(mine)
        reads, count = regions.flat_reads(want, start, end, saved, shards, rows)
        out = None
        try:
            for (rank, e), src, dst, k in reads:
                key_name = f"optim/{name}/{key}"
                size = self._slice(rank, key_name, None)
                if size != (e.end - e.start,):
                    raise CheckpointError(f"{key_name} in {rank_file(rank, 'safetensors')}: {size} elements for "
                                          f"range [{e.start}, {e.end})")
                piece = self._slice(rank, key_name, slice(src - e.start, src - e.start + k)).float()
                if k == end - start:
                    return piece                                  # one slice is the whole range
                if out is None:
                    out = torch.zeros(end - start)
                out[dst:dst + k] = piece
                del piece
        finally:
            self.close()
        if sum(k for *_, k in reads) != count:
            raise CheckpointError(f"{name}: optimizer {key} of tp rank {tp_rank} is not covered by the saved "
                                  f"ranges (a DP shard is missing from {self.dir})")
        return out if out is not None else torch.zeros(end - start)

    def optim_scalars(self) -> dict:
        return decode_json(self.metas[0].optim_scalars)

    def extra_for(self, tp_rank: int, pp_rank: int, dp_rank: int) -> dict:
        """`extra` of the saved rank at these coordinates, wrapped into the saved layout: its own when the
        layout is unchanged, so every rank's RNG streams resume where they were."""
        lay = self.metas[0].layout
        want = (tp_rank % lay["tp"], pp_rank % lay["pp"], dp_rank % lay["dp"])
        for meta in self.metas:
            if tuple(meta.layout[f"{a}_rank"] for a in ("tp", "pp", "dp")) == want:
                return decode_json(meta.extra)
        return decode_json(self.metas[0].extra)
