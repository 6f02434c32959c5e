"""Checkpoint conversion: megagpt <-> Hugging Face Llama, and megagpt resharding, one tensor at a time.

    convert(src, dst, to="hf")                                  any megagpt layout -> an HF directory
    convert(src, dst, to="megagpt", tp=2, pp=2)                 HF -> a megagpt checkpoint (step 0)
    convert(src, dst, to="megagpt", tp=1, pp=4, with_optimizer=True)   reshard, optimizer included

Every path is the same loop: for each global parameter (megagpt names, model order), read its global
tensor from the source (a megagpt checkpoint assembles it from its TP pieces, an HF directory from
its q/k/v or gate/up pieces), then write what the target needs from it (HF tensors, or each target
rank's ShardSpec piece). Output files are safetensors written tensor by tensor from a header planned
up front, and the source's files are closed after every read (safetensors maps them into memory, and
mapped pages count as resident), so memory holds a few copies of the largest tensor, never the model.

The megagpt target is written without any process group: each target rank's chunks are built on the
meta device from a virtual ParallelState, which gives every parameter's global shape and ShardSpec.
Its files are what save_checkpoint writes (rank files, COMPLETE manifest, atomic publish, `latest`).
Optimizer state is written for dp=1 (each rank owns its pieces' whole flat range): which flat ranges
a DP rank owns depends on bucket sizes and the run's DP degree, and load_checkpoint re-cuts them for
whatever DP the loading run has, so dp=1 loads into every DP. HF input with `with_optimizer` gets a
fresh state (fp32 copies of the weights, zero moments, step 0): what a new run starts from, and what
the training loop's --load needs. Only safetensors and JSON are read: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import shutil

import torch
from safetensors import SafetensorError, safe_open

from ..config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig, validate
from ..model.gpt import GPTModel
from ..parallel.random import seed_everything
from ..parallel.state import ParallelState
from ..pipeline.split import stage_chunks
from .hf import (ConversionError, from_hf_config, hf_shapes, hf_to_megagpt, megagpt_names, megagpt_to_hf, to_hf_config,
                 write_hf_tokenizer)
from .sharded import VOCAB_PADDED, _encode, _fit, _params, _Reader
from .st_writer import _ST_DTYPES, SafetensorsWriter
from .store import (FORMAT, clean_stale, find_checkpoint, inside, publish, rank_file, read_json, read_manifest,
                    step_dir_name, verify_file, write_json, write_manifest)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIM_KEYS = ("main", "exp_avg", "exp_avg_sq")


# ----------------------------------------------------------------------------- sources

def _known(cls, fields: dict):
    """A config dataclass from a stored dict, ignoring fields this version does not have."""
    return cls(**{k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(cls)}})


def _global_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = GPTModel(cfg, ParallelState.virtual(), device="meta")
    return {n: tuple(p.meta.global_shape) for n, p in model.named_parameters()}


class MegagptSource:
    """A complete megagpt checkpoint (a run directory or a step directory), any layout."""
    kind = "megagpt"

    def __init__(self, path: str):
        step_dir = find_checkpoint(path)
        manifest = read_manifest(step_dir)
        for name in manifest["files"]:             # sha256 once, up front: the reader then reopens freely
            verify_file(step_dir, name, manifest)
        self.reader = _Reader(step_dir, verify=False)
        meta = self.reader.metas[0]
        self.cfg = _known(ModelConfig, meta["model_config"])
        self.config, self.step, self.dir = meta.get("config") or {}, meta["step"], step_dir
        self.scalars = meta.get("optim_scalars", {})
        for name, shape in _global_shapes(self.cfg).items():
            if name not in self.reader.params:
                raise ConversionError(f"{step_dir}: no tensor {name} in any rank file (the model config needs it)")
            saved = tuple(next(iter(self.reader.params[name].values()))[1]["global_shape"])
            padded = name in VOCAB_PADDED and saved[1:] == shape[1:] and saved[0] >= self.cfg.vocab_size
            if saved != shape and not padded:
                raise ConversionError(f"{step_dir}: {name} has global shape {saved}, the model config gives {shape}")
        embedding = next(iter(self.reader.params["embedding.weight"].values()))[1]
        self.dtype = {str(t).removeprefix("torch."): t for t in _ST_DTYPES}.get(embedding.get("dtype"), torch.float32)

    def param(self, name: str):
        try:
            return self.reader.param(name)        # (global tensor, unpadded vocab rows or None)
        finally:
            self.release()

    def optim(self, name: str, key: str):
        try:
            return self.reader.optim_tensor(name, key)
        finally:
            self.release()

    def release(self) -> None:
        self.reader._files.clear()                # unmaps the rank files (see the module docstring)


class HFSource:
    """An HF model directory: config.json + model.safetensors or an index and its shards. Every file and
    tensor shape is checked against config.json before anything is written."""
    kind = "hf"

    def __init__(self, path: str):
        self.dir, self.handles = path, {}
        self.hf_config = read_json(os.path.join(path, "config.json"), f"{path}/config.json")
        self.cfg = from_hf_config(self.hf_config)
        self.config, self.step = {}, 0
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = read_json(index, index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no weight_map")
            for fname in set(weight_map.values()):
                inside(path, fname, "model.safetensors.index.json weight_map")
            self.index = "model.safetensors.index.json"
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            self.index = None
            weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.files = weight_map
        for hf_name, shape in hf_shapes(self.cfg, self.hf_config).items():
            fname = weight_map.get(hf_name)
            if fname is None:
                raise ConversionError(f"{path}: tensor {hf_name} is in no file (config.json needs it)")
            handle = self._open(fname)
            if hf_name not in handle.keys():
                raise ConversionError(f"{path}/{fname}: no tensor {hf_name}, though {self.index} lists it there")
            got = tuple(handle.get_slice(hf_name).get_shape())
            if got != shape:
                raise ConversionError(f"{path}/{fname}: {hf_name} has shape {got}, config.json gives {shape}")
        embedding = self._open(weight_map["model.embed_tokens.weight"]).get_slice("model.embed_tokens.weight")
        self.dtype = {v: k for k, v in _ST_DTYPES.items()}.get(embedding.get_dtype(), torch.float32)
        self.release()

    def _open(self, fname: str):
        if fname not in self.handles:
            full = os.path.join(self.dir, fname)
            if not os.path.isfile(full):
                raise ConversionError(f"{self.dir}: {fname} is named by {self.index} but missing")
            try:
                self.handles[fname] = safe_open(full, framework="pt")
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{full}: unreadable safetensors file ({e})") from None
        return self.handles[fname]

    def get(self, hf_name: str) -> torch.Tensor:
        return self._open(self.files[hf_name]).get_tensor(hf_name)

    def param(self, name: str):
        try:
            return hf_to_megagpt(name, self.get, self.cfg, 1, self.hf_config), self.cfg.vocab_size
        finally:
            self.release()

    def release(self) -> None:
        self.handles.clear()


def open_source(path: str):
    """The source's format from what the directory holds: config.json means HF, a manifest megagpt."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return HFSource(path)
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such directory")
    return MegagptSource(path)


# ----------------------------------------------------------------------------- megagpt -> HF

def _parse_size(text) -> int:
    """Bytes in "2GB" (10^9, as transformers counts), "500MiB" (2^20) or "10000"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConversionError(f"--max-shard-size: {text!r} is not a size like 2GB, 500MB or 10000")
    unit = (m.group(2) or "B").upper()
    return int(float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20,
                                    "GIB": 2**30}[unit])


def _find_tokenizer(config: dict, override: str | None) -> str | None:
    """The run's tokenizer.json: --tokenizer, else data.tokenizer, else one next to the data prefix."""
    data = config.get("data") or {}
    if override or data.get("tokenizer"):
        path = override or data["tokenizer"]
        if not os.path.isfile(path):
            where = "--tokenizer" if override else "data.tokenizer (the run's config; pass --tokenizer FILE)"
            raise ConversionError(f"{where}: {path} not found")
        return path
    if data.get("path"):
        path = os.path.join(os.path.dirname(data["path"]), "tokenizer.json")
        return path if os.path.isfile(path) else None
    return None


def _write_hf(source, dst: str, dtype, max_shard: int, tokenizer: str | None) -> dict:
    cfg = source.cfg
    hf_config = to_hf_config(cfg)
    names, shapes = megagpt_names(cfg), _global_shapes(cfg)
    # the plan: every HF tensor in write order (split on the meta device: shapes only), cut into shards
    plan = [(n, tuple(t.shape)) for name in names for n, t in
            megagpt_to_hf(name, torch.empty(shapes[name], device="meta"), cfg)]
    item = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for n, shape in plan:
        nbytes = math.prod(shape) * item
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append((n, dtype, shape))
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ConversionError(f"{dst}: exists and is not an empty directory (refusing to overwrite)")
    tmp = f"{dst.rstrip(os.sep)}.tmp-{secrets.token_hex(8)}"    # renamed into place when complete
    os.makedirs(tmp)
    try:
        eos = write_hf_tokenizer(tmp, tokenizer, cfg) if tokenizer else None
        where = {n: i for i, shard in enumerate(shards) for n, _, _ in shard}
        writers = {}
        for name in names:
            full, _ = source.param(name)
            for n, t in megagpt_to_hf(name, full, cfg):
                i = where[n]
                if i not in writers:              # shards fill in plan order: close the previous one
                    for w in writers.values():
                        w.close()
                    writers = {i: SafetensorsWriter(os.path.join(tmp, files[i]), shards[i], {"format": "pt"})}
                writers[i].write(n, t.to(dtype))
            del full, t                            # before the next tensor is read, not after
        for w in writers.values():
            w.close()
        if len(shards) > 1:
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": sum(math.prod(s) * item for _, s in plan)},
                        "weight_map": {n: files[where[n]] for n, _ in plan}})
        dname = str(dtype).removeprefix("torch.")
        write_json(os.path.join(tmp, "config.json"), {**hf_config, "torch_dtype": dname, "dtype": dname,
                                                      "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": None})
        if os.path.isdir(dst):
            os.rmdir(dst)                          # empty, checked above
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": "hf", "files": files, "tensors": len(plan), "tokenizer": tokenizer}


# ----------------------------------------------------------------------------- -> megagpt

def _target_config(source, tp: int, pp: int, vp: int) -> Config:
    """The source's run config (defaults for HF) in the target layout, with dp = 1."""
    raw = source.config
    par = {**(raw.get("parallel") or {}), "tp": tp, "pp": pp, "vp": vp, "world_size": tp * pp}
    par["sequence_parallel"] = bool(par.get("sequence_parallel")) and tp > 1
    if par.get("layers_per_stage") is not None and len(par["layers_per_stage"]) != pp * vp:
        par["layers_per_stage"] = None            # the saved explicit split was for another pp*vp
    train = _known(TrainConfig, raw.get("train") or {})
    train.seq_len = min(train.seq_len, source.cfg.max_seq_len)
    cfg = Config(source.cfg, _known(ParallelConfig, par), train, _known(DataConfig, raw.get("data") or {}))
    # the batch size is the run's business, not the layout's: check the layout with one that fits any pp
    validate(dataclasses.replace(cfg, train=dataclasses.replace(train, global_batch_size=train.micro_batch_size * pp)))
    return cfg


def _target_ranks(cfg: Config) -> list[dict]:
    """Per target rank: its coordinates and {name: (global shape, ShardSpec, written)}, from meta chunks."""
    p, out = cfg.parallel, []
    for pp_rank in range(p.pp):
        for tp_rank in range(p.tp):
            ps = ParallelState.virtual(tp=p.tp, pp=p.pp, tp_rank=tp_rank, pp_rank=pp_rank)
            with torch.device("meta"):
                chunks = [GPTModel(cfg.model, ps, sequence_parallel=p.sequence_parallel, layer_ids=ids,
                                   pre_process=pre, post_process=post, device="meta")
                          for ids, pre, post in stage_chunks(cfg, pp_rank)]
            params = {}
            for name, param, written in _params(chunks):
                params.setdefault(name, (tuple(param.meta.global_shape), param.meta.spec, written))
            # order tp-cp-ep-dp-pp with cp = ep = dp = 1: tp varies fastest
            out.append({"rank": pp_rank * p.tp + tp_rank, "tp_rank": tp_rank, "pp_rank": pp_rank, "ps": ps,
                        "params": params})
    return out


def _fresh_extra(seed: int, tp_rank: int, pp_rank: int) -> dict:
    """The step-0 state a new run at this rank would save: its RNG streams as seed_everything seeds them."""
    saved = torch.get_rng_state()
    try:
        tracker = seed_everything(seed, tp_rank, pp_rank)
        rng = {"torch": torch.get_rng_state(), **{f"tracker/{k}": v for k, v in tracker.get_states().items()}}
    finally:
        torch.set_rng_state(saved)
    return {"step": 0, "consumed_samples": 0, "rng": rng}


def _write_megagpt(source, dst: str, cfg: Config, with_optimizer: bool, dtype, seed: int) -> dict:
    p, m = cfg.parallel, cfg.model
    ranks, names = _target_ranks(cfg), megagpt_names(m)
    fresh = source.kind == "hf"
    for r in ranks:                               # the write order of every rank file
        r["plan"] = []
        for name in names:
            if r["params"].get(name, (0, 0, False))[2]:
                local = r["params"][name][1].local_shape(r["params"][name][0], p.tp)
                r["plan"].append((name, dtype, local))
                r["plan"] += [(f"optim/{name}/{k}", torch.float32, (math.prod(local),))
                              for k in (OPTIM_KEYS if with_optimizer else ())]
    os.makedirs(dst, exist_ok=True)
    clean_stale(dst)
    nonce = secrets.token_hex(8)
    step, tmp = source.step, os.path.join(dst, f"{step_dir_name(source.step)}.tmp-{nonce}")
    os.makedirs(tmp)
    try:
        writers = [SafetensorsWriter(os.path.join(tmp, rank_file(r["rank"], "safetensors")), r["plan"],
                                     {"format": FORMAT}) for r in ranks]
        for name in names:
            # every piece is cut from the global tensor when written and dropped right after: memory
            # holds the global tensor and one piece (each `del` frees before the next read, not after)
            holders = [(r, w) for r, w in zip(ranks, writers) if r["params"].get(name, (0, 0, False))[2]]
            shape, spec, _ = holders[0][0]["params"][name]
            full, vocab = source.param(name)
            full = _fit(name, full, vocab, shape).to(dtype)
            for r, w in holders:
                w.write(name, spec.shard(full, r["tp_rank"], p.tp))
            if with_optimizer and fresh:           # a new run's state: fp32 weights, zero moments
                for r, w in holders:
                    w.write(f"optim/{name}/main", spec.shard(full, r["tp_rank"], p.tp).float().reshape(-1))
                    for key in OPTIM_KEYS[1:]:
                        w.write_zeros(f"optim/{name}/{key}")
            del full
            for key in OPTIM_KEYS if with_optimizer and not fresh else ():
                g, vocab = source.optim(name, key)
                g = _fit(name, g, vocab, shape)
                for r, w in holders:
                    w.write(f"optim/{name}/{key}", spec.shard(g, r["tp_rank"], p.tp).float().reshape(-1))
                del g
        digests = [w.close() for w in writers]
        if with_optimizer and not fresh:
            scalars = source.scalars               # as saved (already in the JSON encoding)
        else:
            scalars = _encode({"step": 0, "loss_scale": cfg.train.initial_loss_scale, "growth_tracker": 0}
                              if with_optimizer else {}, "optimizer state")
        for r, d in zip(ranks, digests):
            extra = _fresh_extra(seed, r["tp_rank"], r["pp_rank"]) if fresh else source.reader.extra_for(r["ps"])
            write_json(os.path.join(tmp, rank_file(r["rank"], "json")),
                       _rank_meta(r, cfg, step, dtype, d, scalars, extra, with_optimizer))
        write_manifest(tmp, step, len(ranks))
        publish(dst, tmp, step, nonce)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": "megagpt", "path": os.path.join(dst, step_dir_name(step)), "step": step,
            "ranks": len(ranks), "optimizer": with_optimizer}


def _rank_meta(r: dict, cfg: Config, step: int, dtype, digest: dict, scalars, extra, with_optimizer) -> dict:
    """The rank's JSON, field for field what save_checkpoint writes (dp = 1)."""
    p, m = cfg.parallel, cfg.model
    tensors, optim = {}, {}
    for name, (shape, spec, written) in r["params"].items():
        if not written:
            continue
        tp = {"dim": spec.dim, "parts": [list(x) for x in spec.parts], "rank": r["tp_rank"], "size": p.tp}
        vocab = {"vocab_rows": m.vocab_size} if name in VOCAB_PADDED else {}
        tensors[name] = {"global_shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "tp": tp, **vocab}
        if with_optimizer:
            optim[name] = {"start": 0, "end": math.prod(spec.local_shape(shape, p.tp)), "keys": list(OPTIM_KEYS),
                           "global_shape": list(shape), "tp": tp, **vocab}
    return {"format": FORMAT, "step": step, "rank": r["rank"], "world_size": p.tp * p.pp,
            "layout": {"order": p.order, "tp": p.tp, "pp": p.pp, "dp": 1,
                       "tp_rank": r["tp_rank"], "pp_rank": r["pp_rank"], "dp_rank": 0},
            "model_config": dataclasses.asdict(m), "config": cfg.to_dict(), "tensors": tensors, "optim": optim,
            "optim_scalars": scalars, "extra": _encode(extra, "extra"), "tensor_file": digest}


# ----------------------------------------------------------------------------- entry point

def convert(src: str, dst: str, to: str, tp: int = 1, pp: int = 1, vp: int = 1, with_optimizer: bool = False,
            dtype: str | None = None, max_shard_size="2GB", tokenizer: str | None = None, seed: int = 1234) -> dict:
    """Convert src (megagpt run/step directory or HF directory, detected) to `to` ("hf" or "megagpt")
    at dst. Raises ConversionError / CheckpointError / ConfigError with a one-line message."""
    if to not in ("hf", "megagpt"):
        raise ConversionError(f"--to: expected hf or megagpt, got {to!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype: expected fp32 or bf16, got {dtype!r}")
    source = open_source(src)
    out_dtype = DTYPES[dtype] if dtype else source.dtype
    if to == "hf":
        if source.kind == "hf":
            raise ConversionError(f"{src}: already an HF directory (use --to megagpt)")
        if (tp, pp, vp) != (1, 1, 1) or with_optimizer:
            raise ConversionError("--tp/--pp/--vp/--with-optimizer: an HF directory has no layout or optimizer state")
        return _write_hf(source, dst, out_dtype, _parse_size(max_shard_size), _find_tokenizer(source.config, tokenizer))
    if source.kind == "megagpt":
        if with_optimizer and not all(n in source.reader.optim for n in megagpt_names(source.cfg)):
            raise ConversionError(f"{source.dir}: has no optimizer state for every parameter; drop --with-optimizer")
        if os.path.realpath(dst) in {os.path.realpath(src), os.path.realpath(os.path.dirname(source.dir))}:
            raise ConversionError(f"{dst}: is the input's run directory (refusing to overwrite the input)")
    cfg = _target_config(source, tp, pp, vp)
    # an HF import keeps the model's tokenizer.json next to the checkpoint and names it in the config,
    # so that an export back to HF finds it again
    hf_tokenizer = os.path.join(source.dir, "tokenizer.json")
    keep_tokenizer = source.kind == "hf" and os.path.isfile(hf_tokenizer)
    if keep_tokenizer:
        cfg.data.tokenizer = os.path.abspath(os.path.join(dst, "tokenizer.json"))
    summary = _write_megagpt(source, dst, cfg, with_optimizer, out_dtype, seed)
    if keep_tokenizer:
        shutil.copyfile(hf_tokenizer, cfg.data.tokenizer)
    return summary
