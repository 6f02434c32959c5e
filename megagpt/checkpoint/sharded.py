"""Sharded checkpoints: every rank writes its own pieces, any layout can read them back.

Each rank writes `rank_XXXXX.safetensors` (its local params under their global names, written by
DP and CP rank 0 only since DP and CP replicas are equal, expert weights by edp rank 0 of each ep rank; its optimizer shard under `optim/<name>/<key>`, written
by every rank) and `rank_XXXXX.json`; format.py holds their schema and the one Writer and Reader.
Loading reads, for each tensor, only the slices of the saved pieces that this rank's piece needs
(flat optimizer ranges -> this rank's flat range; TP pieces -> this rank's piece), so TP, PP, DP and
vocab padding may all differ between save and load. The directory protocol (tmp dir, COMPLETE
manifest, atomic rename, `latest`) lives in store.py. Only safetensors and JSON are read: nothing is
unpickled.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..faults import fault_point
from ..parallel.layers import meta_of
from .format import Reader, TPPiece, Writer, layout_of, piece_of, rank_params
from .store import (CheckpointError, clean_stale, find_checkpoint, prune, publish, rank_file, step_dir_name,
                    write_manifest)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "load_optimizer_state", "find_checkpoint"]


# ----------------------------------------------------------------------------- helpers

def _model_cfg(cfg, chunks) -> ModelConfig:
    """Accepts the run's Config, a ModelConfig, or None (the chunks' own config)."""
    if cfg is None:
        return chunks[0].cfg
    return cfg.model if hasattr(cfg, "model") else cfg


def _all_ok(ps, ok: bool) -> bool:
    """True when every rank reports ok: one all-reduce that doubles as the barrier between phases."""
    if ps.world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=ps.device)
    # direct, not through parallel/: a save's control flag, not a step's traffic (comm_model leaves it out)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def _shared_nonce(ps) -> str:
    """One random tmp-dir suffix for all ranks (rank 0's, broadcast)."""
    value = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=ps.device)
    if ps.world_size > 1:  # direct, uncounted on purpose: once per save, not per step (comm_model's docstring)
        dist.broadcast(value, src=0)
    return f"{value.item():016x}"


# ----------------------------------------------------------------------------- save

def _write_rank(tmp_dir: str, step: int, chunks, ps, model_cfg: ModelConfig, cfg, extra, optimizer) -> None:
    """This rank's files through the format's Writer: its params (DP and CP rank 0 only: the replicas are equal),
    then its optimizer ranges, each param followed by its optimizer state."""
    state = (optimizer.state_for_checkpoint(copy=False) if hasattr(optimizer, "state_for_checkpoint")
             else (optimizer or {}))                          # views: each is streamed to disk, never copied
    params, scalars = {}, {}
    for name, p, written in rank_params(chunks):
        params.setdefault(name, (p, written))
    for key, value in state.items():
        if not (isinstance(value, dict) and "start" in value):
            scalars[key] = value
        elif key not in params:
            raise CheckpointError(f"optimizer state names {key!r}, which is not a parameter of this rank's chunks")
    writer = Writer(tmp_dir, step, ps.rank, ps.world_size, layout_of(ps), model_cfg,
                    cfg.to_dict() if hasattr(cfg, "to_dict") else None)
    tensors = []                                              # (key, tensor) in the writer's plan order
    for name, (p, written) in params.items():
        if not written:
            continue                                          # the tied copy: the first stage's is kept
        meta = meta_of(p)                                     # a state buffer has none: replicated
        tp = TPPiece.of(*piece_of(meta, ps))
        if (ps.edp if meta.expert else ps.dp_cp).rank == 0:        # one replica (over DP and CP) writes
            writer.add_param(name, p.dtype, meta.global_shape, tp)
            tensors.append((name, p))
        value = state.get(name)
        if isinstance(value, dict) and "start" in value:
            start, end = int(value["start"]), int(value["end"])
            keys = [k for k, t in value.items() if torch.is_tensor(t)]
            for k in keys:
                if value[k].numel() != end - start:
                    raise CheckpointError(f"optimizer state {name}.{k}: {value[k].numel()} elements for range "
                                          f"[{start}, {end})")
            dtype = value[keys[0]].dtype if keys else torch.float32
            writer.add_optim(name, start, end, keys, meta.global_shape, tp, dtype)
            tensors += [(f"optim/{name}/{k}", value[k].reshape(-1)) for k in keys]
    for key, t in tensors:
        writer.write(key, t)
    # test hook (faults.py), inert unless asked: die with this rank's tensor file half written
    fault_point("shard", step, ps.rank, cut=os.path.join(tmp_dir, rank_file(ps.rank, "safetensors")))
    writer.close(scalars, extra or {})


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

class _LazyEntry(Mapping):
    """One parameter's optimizer entry {"start", "end", key: tensor}; each tensor is read from the files
    when asked for, so a load holds one of them at a time, never the whole state."""

    def __init__(self, reader: Reader, name: str, layout: tuple, start: int, end: int):
        self.reader, self.name, self.layout, self.start, self.end = reader, name, layout, start, end
        self.keys_ = reader.optim_keys(name)

    def __getitem__(self, key):
        if key == "start":
            return self.start
        if key == "end":
            return self.end
        if key not in self.keys_:
            raise KeyError(key)
        return self.reader.read_optim(self.name, key, *self.layout, self.start, self.end)

    def __iter__(self):
        return iter(["start", "end", *self.keys_])

    def __len__(self):
        return 2 + len(self.keys_)


def _optimizer_state(reader: Reader, params: dict, ranges: dict) -> dict:
    """state_for_checkpoint's format for these ranges, its tensors read lazily (see _LazyEntry).
    params: {name: (global_shape, ShardSpec, tp_rank, tp_size)}; ranges: {name: (start, end)}."""
    out = reader.optim_scalars()
    for name, (start, end) in ranges.items():
        if name not in params:
            raise CheckpointError(f"optimizer range for {name!r}, which is not a parameter of this rank's chunks")
        global_shape, spec, tp_rank, tp_size = params[name]
        n = torch.Size(spec.local_shape(tuple(global_shape), tp_size)).numel()
        if end > n:
            raise CheckpointError(f"{name}: requested range [{start}, {end}) exceeds its {n} elements")
        out[name] = _LazyEntry(reader, name, (global_shape, spec, tp_rank, tp_size), start, end)
    return out


def load_optimizer_state(ckpt_dir: str, params: dict, ranges: dict, verify: bool = True) -> dict:
    """The optimizer state for this rank's ranges, in state_for_checkpoint's format, whatever layout wrote it.
    params: {name: (global_shape, ShardSpec, tp_rank, tp_size)} of this rank; ranges: {name: (start, end)}
    into each param's flattened local tensor. ckpt_dir: a step directory or a run directory."""
    with Reader(find_checkpoint(ckpt_dir), verify) as reader:
        state = _optimizer_state(reader, params, ranges)
        return {k: dict(v) if isinstance(v, _LazyEntry) else v for k, v in state.items()}


@torch.no_grad()
def load_checkpoint(path: str, chunks, ps, cfg=None, optimizer=None, verify: bool = True,
                    stats: dict | None = None) -> dict:
    """Collective-free: each rank reads what it needs. Loads the newest complete checkpoint under `path`
    (or that step directory) into the chunks' params, resharding as needed, and into `optimizer` (an object
    with owned_ranges/load_from_checkpoint). Returns this rank's `extra`. verify: check sha256.
    stats: a dict that receives the Reader's "bytes_read" (tensor data) and "bytes_hashed" (verify).
    Each tensor is read as the slices of the saved pieces that this rank's piece needs, and copied in
    place: memory grows by one tensor, never by a copy of the weights or of the optimizer state."""
    if hasattr(optimizer, "finish_param_sync"):
        optimizer.finish_param_sync()          # zero3: the weights whole before they are written
    with Reader(find_checkpoint(path), verify) as reader:
        reader.check_config(_model_cfg(cfg, chunks))
        layouts = {}
        for name, p, _ in rank_params(chunks):
            meta = meta_of(p)
            layouts[name] = (tuple(meta.global_shape), *piece_of(meta, ps))
            p.copy_(reader.read_param(name, *layouts[name]))
        if optimizer is not None:
            optimizer.load_from_checkpoint(_optimizer_state(reader, layouts, optimizer.owned_ranges()))
        if stats is not None:
            stats.update(bytes_read=reader.bytes_read, bytes_hashed=reader.bytes_hashed)
        return reader.extra_for(ps.tp.rank, ps.pp.rank, ps.dp.rank)
