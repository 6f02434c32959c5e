"""Sharded checkpoints: every rank writes its own pieces, any layout can read them back.

Each rank writes `rank_XXXXX.safetensors` (its local params under their global names, written by
DP rank 0 only since DP replicas are equal; its optimizer shard under `optim/<name>/<key>`, written
by every rank) and `rank_XXXXX.json` (per tensor: global shape, the TP ShardSpec and this rank's TP
coordinate; per optimizer entry its flat range; the layout, the model config and `extra`).
Loading rebuilds each global tensor from whichever layout wrote it (flat optimizer ranges -> local
TP pieces -> ShardSpec.unshard -> global), then cuts this run's piece from it: TP, PP, DP and vocab
padding may all differ between save and load. The directory protocol (tmp dir, COMPLETE manifest,
atomic rename, `latest`) lives in store.py. Only safetensors and JSON are read: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..parallel.layers import ShardSpec
from .store import (FORMAT, CheckpointError, clean_stale, digest, find_checkpoint, fsync_path, inside, prune,
                    publish, rank_file, read_json, read_manifest, step_dir_name, verify_file, write_json,
                    write_manifest)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_optimizer_state", "find_checkpoint"]

# Fields that fix the tensors' shapes or meaning: a checkpoint loads only into a model that agrees on
# all of them. Others (dropout, rope_scaling for context extension, max_seq_len, ...) may change.
ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "kv_heads", "ffn_hidden_size", "mlp",
               "norm", "bias", "tie_embeddings", "rotary_fraction", "rope_interleaved")
VOCAB_PADDED = ("embedding.weight", "lm_head.weight")     # dim 0 is the padded vocab


# ----------------------------------------------------------------------------- helpers

def _model_cfg(cfg, chunks) -> ModelConfig:
    """Accepts the run's Config, a ModelConfig, or None (the chunks' own config)."""
    if cfg is None:
        return chunks[0].cfg
    return cfg.model if hasattr(cfg, "model") else cfg


def _params(chunks) -> list[tuple[str, torch.nn.Parameter, bool]]:
    """(global name, param, written) for this rank. With tied embeddings and pp > 1 the last stage
    holds a copy of the embedding; the first stage's is written and both are loaded from it."""
    out, seen = [], set()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            copy = p.meta.tied_copy
            out.append((name, p, name not in seen and not copy))
            seen.add(name)
    return out


def _tp_meta(p, ps) -> dict:
    spec = p.meta.spec
    return {"dim": spec.dim, "parts": [list(part) for part in spec.parts], "rank": ps.tp.rank, "size": ps.tp.size}


def _spec(meta: dict) -> ShardSpec:
    return ShardSpec(meta["dim"], tuple(tuple(part) for part in meta["parts"]))


def _encode(obj, where: str):
    """JSON-able copy of `extra`: tensors (RNG states) become {"__tensor__": dtype, "shape", "data"}."""
    if torch.is_tensor(obj):
        return {"__tensor__": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape),
                "data": obj.detach().cpu().reshape(-1).tolist()}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise CheckpointError(f"{where}: dict keys must be strings to be stored as JSON")
        return {k: _encode(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be stored in a checkpoint (JSON or tensors only)")


def _decode(obj):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["data"], dtype=getattr(torch, obj["__tensor__"])).reshape(obj["shape"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _all_ok(ps, ok: bool) -> bool:
    """True when every rank reports ok: one all-reduce that doubles as the barrier between phases."""
    if ps.world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=ps.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _shared_nonce(ps) -> str:
    """One random tmp-dir suffix for all ranks (rank 0's, broadcast)."""
    value = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=ps.device)
    if ps.world_size > 1:
        dist.broadcast(value, src=0)
    return f"{value.item():016x}"


# ----------------------------------------------------------------------------- save

def _write_rank(tmp_dir: str, step: int, chunks, ps, model_cfg: ModelConfig, cfg, extra, optimizer) -> None:
    tensors, entries, optim, scalars = {}, {}, {}, {}
    params = {}
    for name, p, written in _params(chunks):
        params.setdefault(name, (p, written))
        if written and ps.dp.rank == 0:
            tensors[name] = p.detach().contiguous().cpu()
            entries[name] = {"global_shape": list(p.meta.global_shape), "dtype": str(p.dtype).removeprefix("torch."),
                             "tp": _tp_meta(p, ps)}
            if name in VOCAB_PADDED:
                entries[name]["vocab_rows"] = model_cfg.vocab_size
    state = optimizer.state_for_checkpoint() if hasattr(optimizer, "state_for_checkpoint") else (optimizer or {})
    for key, value in state.items():
        if not (isinstance(value, dict) and "start" in value):
            scalars[key] = value
            continue
        if key not in params:
            raise CheckpointError(f"optimizer state names {key!r}, which is not a parameter of this rank's chunks")
        p, written = params[key]
        if not written:
            continue                                          # the tied copy: the first stage's state is kept
        start, end = int(value["start"]), int(value["end"])
        keys = [k for k, t in value.items() if torch.is_tensor(t)]
        for k in keys:
            t = value[k]
            if t.numel() != end - start:
                raise CheckpointError(f"optimizer state {key}.{k}: {t.numel()} elements for range [{start}, {end})")
            tensors[f"optim/{key}/{k}"] = t.detach().reshape(-1).contiguous().cpu()
        optim[key] = {"start": start, "end": end, "keys": keys, "global_shape": list(p.meta.global_shape),
                      "tp": _tp_meta(p, ps)}
        if key in VOCAB_PADDED:
            optim[key]["vocab_rows"] = model_cfg.vocab_size
    meta = {"format": FORMAT, "step": step, "rank": ps.rank, "world_size": ps.world_size,
            "layout": {"order": ps.order, **{a: ps.groups[a].size for a in ("tp", "pp", "dp")},
                       **{f"{a}_rank": ps.groups[a].rank for a in ("tp", "pp", "dp")}},
            "model_config": dataclasses.asdict(model_cfg),
            "config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
            "tensors": entries, "optim": optim,
            "optim_scalars": _encode(scalars, "optimizer state"), "extra": _encode(extra or {}, "extra")}
    st_path = os.path.join(tmp_dir, rank_file(ps.rank, "safetensors"))
    save_file(tensors, st_path, metadata={"format": FORMAT})
    fsync_path(st_path)
    meta["tensor_file"] = digest(st_path)
    write_json(os.path.join(tmp_dir, rank_file(ps.rank, "json")), meta)


def save_checkpoint(run_dir: str, step: int, chunks, ps, cfg=None, extra: dict | None = None, optimizer=None,
                    keep: int = 2, before_publish=None) -> str:
    """Collective: every rank calls it. Writes run_dir/step_XXXXXXXX atomically, points `latest` at it
    and keeps the newest `keep` checkpoints. `cfg`: the run's Config (stored) or None; `extra`: this
    rank's JSON-able state (tensors allowed: RNG states); `optimizer`: an object with
    state_for_checkpoint(), or that dict itself, or None. Returns the step directory.
    `before_publish` (rank 0, after every shard is written): a test hook to kill the save midway.
    A failure on any rank raises CheckpointError on every rank and leaves the last good one as it was."""
    if hasattr(optimizer, "finish_param_sync"):
        optimizer.finish_param_sync()      # the weights of the last step may still be in flight
    model_cfg = _model_cfg(cfg, chunks)
    nonce = _shared_nonce(ps)
    tmp_dir = os.path.join(run_dir, f"{step_dir_name(step)}.tmp-{nonce}")
    error = None
    if ps.rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            clean_stale(run_dir)
            os.makedirs(tmp_dir)
        except OSError as e:
            error = e
    if _all_ok(ps, error is None):
        try:
            _write_rank(tmp_dir, step, chunks, ps, model_cfg, cfg, extra, optimizer)
        except Exception as e:  # noqa: BLE001 -- any failure must reach the other ranks, else they hang
            error = e
        if _all_ok(ps, error is None) and ps.rank == 0:
            try:
                if before_publish is not None:
                    before_publish()
                write_manifest(tmp_dir, step, ps.world_size)
                published_dir = publish(run_dir, tmp_dir, step, nonce)
                prune(run_dir, keep, protect=published_dir)
            except Exception as e:  # noqa: BLE001
                error = e
        published = _all_ok(ps, error is None)
    else:
        published = False
    if not published:
        if ps.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        where = f"on rank {ps.rank}: {error}" if error is not None else "on another rank"
        raise CheckpointError(f"save of step {step} to {run_dir} failed {where}; the previous checkpoint "
                              f"is untouched") from error
    return os.path.join(run_dir, step_dir_name(step))


# ----------------------------------------------------------------------------- load

class _Reader:
    """The index of one checkpoint: every rank's metadata, with lazily opened, checked tensor files."""

    def __init__(self, step_dir: str, verify: bool = True):
        self.dir, self.verify = step_dir, verify
        self.manifest = read_manifest(step_dir)
        self.world = self.manifest["world_size"]
        self.metas, self._files = [], {}
        self.params: dict[str, dict[int, tuple[int, dict]]] = {}       # name -> tp rank -> (file rank, entry)
        self.optim: dict[str, dict[int, list[tuple[int, dict]]]] = {}  # name -> tp rank -> [(file rank, entry)]
        for rank in range(self.world):
            name = rank_file(rank, "json")
            if verify:
                verify_file(step_dir, name, self.manifest)
            meta = read_json(inside(step_dir, name, "rank metadata"), f"{step_dir}/{name}")
            if meta.get("format") != FORMAT or meta.get("rank") != rank:
                raise CheckpointError(f"{step_dir}/{name}: not the {FORMAT} metadata of rank {rank}")
            self.metas.append(meta)
            for pname, entry in meta["tensors"].items():
                self.params.setdefault(pname, {})[entry["tp"]["rank"]] = (rank, entry)
            for pname, entry in meta["optim"].items():
                self.optim.setdefault(pname, {}).setdefault(entry["tp"]["rank"], []).append((rank, entry))

    def check_config(self, cfg: ModelConfig) -> None:
        saved = self.metas[0]["model_config"]
        saved_kv = 1 if saved.get("multi_query") else (saved.get("num_kv_heads") or saved.get("num_heads"))
        for f in ARCH_FIELDS:
            have = saved_kv if f == "kv_heads" else saved.get(f)
            if have != getattr(cfg, f):
                raise CheckpointError(f"model.{f}: the checkpoint in {self.dir} has {have!r}, this model has "
                                      f"{getattr(cfg, f)!r}")

    def read(self, rank: int, key: str) -> torch.Tensor:
        name = rank_file(rank, "safetensors")
        if rank not in self._files:
            if self.verify:
                verify_file(self.dir, name, self.manifest)
            try:
                self._files[rank] = safe_open(inside(self.dir, name, "tensor file"), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.dir}/{name}: unreadable safetensors file ({e})") from None
        f = self._files[rank]
        if key not in f.keys():
            raise CheckpointError(f"{self.dir}/{name}: no tensor {key!r}, though its metadata lists it")
        try:
            return f.get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"{self.dir}/{name}: cannot read {key!r} ({e})") from None

    def _layout(self, name: str, entries: list[dict]) -> tuple[ShardSpec, int, tuple, int | None]:
        first = entries[0]
        spec, size, shape = _spec(first["tp"]), first["tp"]["size"], tuple(first["global_shape"])
        for e in entries[1:]:
            if (_spec(e["tp"]), e["tp"]["size"], tuple(e["global_shape"])) != (spec, size, shape):
                raise CheckpointError(f"{name}: rank files disagree on its global shape or TP split ({self.dir})")
        return spec, size, shape, first.get("vocab_rows")

    def _assemble(self, name: str, what: str, per_tp: dict, spec, size, shape, read_piece) -> torch.Tensor:
        local_shape = spec.local_shape(shape, size)
        pieces = []
        for r in range(size):
            if r not in per_tp:
                raise CheckpointError(f"{name}: the checkpoint in {self.dir} has no {what} for tp rank {r} of {size}")
            piece = read_piece(r, local_shape)
            if tuple(piece.shape) != tuple(local_shape):
                raise CheckpointError(f"{name}: the {what} of tp rank {r} has shape {tuple(piece.shape)}, expected "
                                      f"{tuple(local_shape)} (global {shape} over tp={size})")
            pieces.append(piece)
        return spec.unshard(pieces)

    def param(self, name: str):
        """(global tensor, vocab_rows) of a parameter."""
        per_tp = self.params.get(name)
        if not per_tp:
            raise CheckpointError(f"{name}: not in the checkpoint in {self.dir}")
        spec, size, shape, vocab = self._layout(name, [e for _, e in per_tp.values()])
        full = self._assemble(name, "shard", per_tp, spec, size, shape, lambda r, _: self.read(per_tp[r][0], name))
        return full, vocab

    def optim_tensor(self, name: str, key: str):
        """(global tensor, vocab_rows) of one optimizer tensor, from the DP shards of every TP rank."""
        per_tp = self.optim.get(name)
        if not per_tp:
            raise CheckpointError(f"{name}: no optimizer state in the checkpoint in {self.dir}")
        spec, size, shape, vocab = self._layout(name, [e for es in per_tp.values() for _, e in es])

        def local(r, local_shape):
            n, cursor, parts = int(torch.Size(local_shape).numel()), 0, []
            # DP shards tile [0, n); a tied copy or replica may cover a range twice: take each element once
            for rank, e in sorted(per_tp[r], key=lambda x: x[1]["start"]):
                if e["start"] <= cursor < e["end"]:
                    t = self.read(rank, f"optim/{name}/{key}")
                    if t.numel() != e["end"] - e["start"]:
                        raise CheckpointError(f"optim/{name}/{key} in {rank_file(rank, 'safetensors')}: {t.numel()} "
                                              f"elements for range [{e['start']}, {e['end']})")
                    parts.append(t[cursor - e["start"]:])
                    cursor = e["end"]
            if cursor != n:
                raise CheckpointError(f"{name}: optimizer {key} of tp rank {r} covers [0, {cursor}) of {n} elements "
                                      f"(a DP shard is missing from {self.dir})")
            return torch.cat(parts).reshape(local_shape)
        return self._assemble(name, f"optimizer {key}", per_tp, spec, size, shape, local), vocab

    def extra_for(self, ps) -> dict:
        """`extra` of the saved rank at this rank's (tp, pp, dp) coordinates, wrapped into the saved layout:
        its own when the layout is unchanged, so every rank's RNG streams resume where they were."""
        lay = self.metas[0]["layout"]
        want = tuple(ps.groups[a].rank % lay[a] for a in ("tp", "pp", "dp"))
        for meta in self.metas:
            if tuple(meta["layout"][f"{a}_rank"] for a in ("tp", "pp", "dp")) == want:
                return _decode(meta["extra"])
        return _decode(self.metas[0]["extra"])


def _fit(name: str, full: torch.Tensor, vocab_rows: int | None, shape: tuple) -> torch.Tensor:
    """The saved global tensor in this model's global shape: only the vocab padding may differ
    (its rows are re-padded with zeros); anything else is an error that names the tensor."""
    shape = tuple(shape)
    if tuple(full.shape) == shape:
        return full
    if vocab_rows is not None and tuple(full.shape[1:]) == shape[1:] and shape[0] >= vocab_rows:
        out = full.new_zeros(shape)
        out[:vocab_rows] = full[:vocab_rows]
        return out
    raise CheckpointError(f"{name}: the checkpoint's global shape is {tuple(full.shape)}, this model's is {shape}")


def _load_optimizer(reader: _Reader, params: dict, ranges: dict) -> dict:
    out = _decode(reader.metas[0]["optim_scalars"])
    for name, (start, end) in ranges.items():
        if name not in params:
            raise CheckpointError(f"optimizer range for {name!r}, which is not a parameter of this rank's chunks")
        global_shape, spec, tp_rank, tp_size = params[name]
        entries = [e for es in reader.optim.get(name, {}).values() for _, e in es]
        entry = {"start": start, "end": end}
        for key in (entries[0]["keys"] if entries else ["main", "exp_avg", "exp_avg_sq"]):
            full, vocab = reader.optim_tensor(name, key)
            local = spec.shard(_fit(name, full, vocab, global_shape), tp_rank, tp_size).reshape(-1)
            if end > local.numel():
                raise CheckpointError(f"{name}: requested range [{start}, {end}) exceeds its {local.numel()} elements")
            entry[key] = local[start:end].clone()
        out[name] = entry
    return out


def load_optimizer_state(ckpt_dir: str, params: dict, ranges: dict, verify: bool = True) -> dict:
    """The optimizer state for this rank's ranges, in state_for_checkpoint's format, whatever layout wrote it.
    params: {name: (global_shape, ShardSpec, tp_rank, tp_size)} of this rank; ranges: {name: (start, end)}
    into each param's flattened local tensor. ckpt_dir: a step directory or a run directory."""
    return _load_optimizer(_Reader(find_checkpoint(ckpt_dir), verify), params, ranges)


@torch.no_grad()
def load_checkpoint(path: str, chunks, ps, cfg=None, optimizer=None, verify: bool = True) -> dict:
    """Collective-free: each rank reads what it needs. Loads the newest complete checkpoint under `path`
    (or that step directory) into the chunks' params, resharding as needed, and into `optimizer` (an object
    with state_for_checkpoint/load_from_checkpoint). Returns this rank's `extra`. verify: check sha256."""
    reader = _Reader(find_checkpoint(path), verify)
    reader.check_config(_model_cfg(cfg, chunks))
    layouts = {}
    for name, p, _ in _params(chunks):
        full, vocab = reader.param(name)
        p.copy_(p.meta.spec.shard(_fit(name, full, vocab, p.meta.global_shape), ps.tp.rank, ps.tp.size))
        layouts[name] = (tuple(p.meta.global_shape), p.meta.spec, ps.tp.rank, ps.tp.size)
    if optimizer is not None:
        current = optimizer.state_for_checkpoint()          # for the ranges this rank now owns
        ranges = {k: (v["start"], v["end"]) for k, v in current.items() if isinstance(v, dict) and "start" in v}
        del current
        optimizer.load_from_checkpoint(_load_optimizer(reader, layouts, ranges))
    return reader.extra_for(ps)
