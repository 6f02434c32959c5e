"""Checkpoint conversion: megagpt <-> Hugging Face Llama, and megagpt resharding, one tensor at a time.

    convert(src, dst, to="hf")                                  any megagpt layout -> an HF directory
    convert(src, dst, to="megagpt", tp=2, pp=2)                 HF -> a megagpt checkpoint (step 0)
    convert(src, dst, to="megagpt", ep=2)                       HF Mixtral -> experts split over 2 ep ranks
    convert(src, dst, to="megagpt", tp=1, pp=4, with_optimizer=True)   reshard, optimizer included

Every path is the same loop: for each global parameter (megagpt names, model order), read its global
tensor from the source (a megagpt checkpoint assembles it from its TP pieces, an HF directory from
its q/k/v or gate/up pieces), then write what the target needs from it (HF tensors, or each target
rank's ShardSpec piece). Output files are safetensors written tensor by tensor from a header planned
up front, and the source's files are closed after every read (safetensors maps them into memory, and
mapped pages count as resident), so memory holds a few copies of the largest tensor, never the model.

The megagpt target is written without any process group: each target rank's chunks are built on the
meta device from a virtual ParallelState, which gives every parameter's global shape and ShardSpec.
Its rank files are written through format.Writer, as save_checkpoint writes them (then the COMPLETE
manifest, atomic publish, `latest`); the training state is TrainState's, as a new run's would be.
Optimizer state is written for dp=1, or dp = ep with expert parallelism (each rank owns its pieces'
whole flat range: the dense weights' on dp rank 0, each ep rank its experts'): which flat ranges a DP
rank owns depends on bucket sizes and the run's DP degree, and load_checkpoint re-cuts them for
whatever DP (and EP) the loading run has. Experts are stored as each ep rank's piece (as
save_checkpoint stores them); an HF Mixtral directory maps through hf_mixtral.py. HF input with `with_optimizer` gets a
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

from ..config import DTYPES as TRAIN_DTYPES
from ..config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
from ..config_checks import validate
from ..layout import Layout
from ..parallel.layers import ShardSpec, meta_of
from ..pipeline.split import meta_stage
from .format import STATE_BUFFERS, VOCAB_PADDED, Reader, TPPiece, Writer, layout_of, piece_of, rank_params
from .hf import (HEADS, VALUE_HEAD_FILE, ConversionError, from_hf_config, hf_shapes, hf_to_megagpt, megagpt_names,
                 megagpt_to_hf, to_hf_config)
from .hf_files import HFDirectory, write_hf_tokenizer
from .regions import fit_rows
from .st_writer import _ST_DTYPES, SafetensorsWriter
from .store import (clean_stale, find_checkpoint, publish, read_manifest, step_dir_name, verify_file, write_json,
                    write_manifest)
from .train_state import TrainState
from ..multimodal.hf_adapters import ADAPTERS_FILE, HF_KEY, hf_multimodal, is_adapter, read_adapter, write_adapters

def _is_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in STATE_BUFFERS


DTYPES = {k: v for k, v in TRAIN_DTYPES.items() if k in ("fp32", "bf16")}   # what --dtype accepts
OPTIM_KEYS = ("main", "exp_avg", "exp_avg_sq")


# ----------------------------------------------------------------------------- sources

def _known(cls, fields: dict):
    """A config dataclass from a stored dict, ignoring fields this version does not have."""
    return cls(**{k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(cls)}})


def _global_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Global shape of every tensor a checkpoint holds (parameters and state buffers), in model order:
    the one-rank model built on the meta device."""
    return {n: tuple(meta_of(p).global_shape) for n, p, _ in rank_params(meta_stage(Config(model=cfg)))}


class MegagptSource:
    """A complete megagpt checkpoint (a run directory or a step directory), any layout."""
    kind = "megagpt"

    def __init__(self, path: str):
        step_dir = find_checkpoint(path)
        manifest = read_manifest(step_dir)
        for name in manifest["files"]:             # sha256 once, up front: the reader then reopens freely
            verify_file(step_dir, name, manifest)
        self.reader = Reader(step_dir, verify=False)
        meta = self.reader.metas[0]
        self.cfg = _known(ModelConfig, meta.model_config)
        self.config, self.step, self.dir = meta.config or {}, meta.step, step_dir
        self.scalars = meta.optim_scalars
        # the post-training heads (align/): a reward model has reward_head and no LM head, PPO's policy a value_head
        self.heads = tuple(n for n in HEADS if n in self.reader.params)
        self.shapes = _global_shapes(self.cfg)
        if "reward_head" in self.heads:
            self.shapes.pop("lm_head.weight", None)
        self.shapes.update({n: (1, self.cfg.hidden_size) for n in self.heads})
        for name, shape in self.shapes.items():
            if name not in self.reader.params:
                raise ConversionError(f"{step_dir}: no tensor {name} in any rank file (the model config needs it)")
            saved = self.reader.global_shape(name)
            padded = name in VOCAB_PADDED and saved[1:] == shape[1:] and saved[0] >= self.cfg.vocab_size
            if saved != shape and not padded:
                raise ConversionError(f"{step_dir}: {name} has global shape {saved}, the model config gives {shape}")
        embedding = next(iter(self.reader.params["embedding.weight"].values()))[1]
        self.dtype = {str(t).removeprefix("torch."): t for t in _ST_DTYPES}.get(embedding.dtype, torch.float32)

    def has_optimizer(self, names) -> bool:
        return all(n in self.reader.optim for n in names)

    def param(self, name: str, shape: tuple) -> torch.Tensor:
        """The global tensor in this global shape (vocab padding re-cut)."""
        return self.reader.read_param(name, shape, ShardSpec(), 0, 1)

    def optim(self, name: str, key: str, shape: tuple) -> torch.Tensor:
        return self.reader.read_optim(name, key, shape, ShardSpec(), 0, 1, 0, math.prod(shape)).reshape(shape)

    def train_state(self, tp_rank: int, pp_rank: int) -> dict:
        return self.reader.extra_for(tp_rank, pp_rank, 0)


class HFSource:
    """An HF model directory: config.json + model.safetensors or an index and its shards. Every file and
    tensor shape is checked against config.json before anything is written."""
    kind = "hf"

    def __init__(self, path: str):
        self.dir, self.files = path, HFDirectory(path)
        self.hf_config = self.files.config
        self.mixtral = (self.hf_config.get("architectures") or [None])[0] == "MixtralForCausalLM"
        if self.mixtral:                          # experts (hf_mixtral.py): its shapes from the map itself
            from .hf_mixtral import from_mixtral_config, megagpt_to_mixtral
            self.cfg = from_mixtral_config(self.hf_config)
            shapes = {n: tuple(t.shape) for name, shape in _global_shapes(self.cfg).items()
                      for n, t in megagpt_to_mixtral(name, torch.empty(shape, device="meta"), self.cfg)}
        else:
            self.cfg = from_hf_config(self.hf_config)
            shapes = hf_shapes(self.cfg, self.hf_config)
        self.config, self.step = {}, 0
        try:
            for hf_name, shape in shapes.items():
                if not self.files.has(hf_name):
                    raise ConversionError(f"{path}: tensor {hf_name} is in no file (config.json needs it)")
                got = self.files.shape(hf_name)
                if got != shape:
                    raise ConversionError(f"{path}/{self.files.file_of(hf_name)}: {hf_name} has shape {got}, "
                                          f"config.json gives {shape}")
            self.dtype = {v: k for k, v in _ST_DTYPES.items()}.get(self.files.dtype("model.embed_tokens.weight"),
                                                                  torch.float32)
        finally:
            self.files.close()

    def param(self, name: str, shape: tuple) -> torch.Tensor:
        if is_adapter(name):
            return read_adapter(self.dir, name, shape)
        try:
            if self.mixtral:
                from .hf_mixtral import mixtral_to_megagpt
                full = mixtral_to_megagpt(name, self.files.get, self.cfg)
            else:
                full = hf_to_megagpt(name, self.files.get, self.cfg, 1, self.hf_config)
            return fit_rows(name, full, self.cfg.vocab_size, shape)
        finally:
            self.files.close()                    # unmaps the files (see the module docstring)


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
    """The run's tokenizer.json: --tokenizer, else data.tokenizer, else one next to the data prefix
    (tokenizer.json in its directory, or PREFIX.tokenizer.json as tools/preprocess_chat.py writes it)."""
    data = config.get("data") or {}
    if override or data.get("tokenizer"):
        path = override or data["tokenizer"]
        if not os.path.isfile(path):
            where = "--tokenizer" if override else "data.tokenizer (the run's config; pass --tokenizer FILE)"
            raise ConversionError(f"{where}: {path} not found")
        return path
    if data.get("path"):
        for path in (data["path"] + ".tokenizer.json", os.path.join(os.path.dirname(data["path"]), "tokenizer.json")):
            if os.path.isfile(path):
                return path
    return None


def _write_hf(source, dst: str, dtype, max_shard: int, tokenizer: str | None) -> dict:
    cfg, heads = source.cfg, source.heads
    if heads and cfg.moe_num_experts:
        raise ConversionError(f"{source.dir}: a mixture of experts with {' and '.join(heads)} has no HF export")
    if "reward_head" in heads and not tokenizer:
        raise ConversionError("--tokenizer: a reward model's HF export needs its tokenizer.json (the pad token "
                              "marks the last real token, where the reward is read)")
    if cfg.moe_num_experts:                        # a mixture of experts exports as Mixtral (hf_mixtral.py)
        from .hf_mixtral import megagpt_to_mixtral as to_hf, mixtral_names, to_mixtral_config
        hf_config, names = to_mixtral_config(cfg), mixtral_names(cfg)
    else:
        to_hf, hf_config, names = megagpt_to_hf, to_hf_config(cfg), megagpt_names(cfg)
    names = [n for n in names if not is_adapter(n)]      # the adapters go to their own file (hf_adapters.py)
    if "reward_head" in heads:                     # the trunk and a one-label score head, no LM head
        names = [n for n in names if n != "lm_head.weight"] + ["reward_head"]
        hf_config.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
                         label2id={"LABEL_0": 0})
    shapes = source.shapes
    # the plan: every HF tensor in write order (split on the meta device: shapes only), cut into shards
    plan = [(n, tuple(t.shape)) for name in names for n, t in
            to_hf(name, torch.empty(shapes[name], device="meta"), cfg)]
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
        eos, end = write_hf_tokenizer(tmp, tokenizer, cfg) if tokenizer else (None, None)
        where = {n: i for i, shard in enumerate(shards) for n, _, _ in shard}
        writers = {}
        for name in names:
            full = source.param(name, shapes[name])
            for n, t in to_hf(name, full, cfg):
                i = where[n]
                if i not in writers:              # shards fill in plan order: close the previous one
                    for w in writers.values():
                        w.close()
                    writers = {i: SafetensorsWriter(os.path.join(tmp, files[i]), shards[i], {"format": "pt"})}
                writers[i].write(n, t.to(dtype))
            del full, t                            # before the next tensor is read, not after
        for w in writers.values():
            w.close()
        adapters = write_adapters(tmp, cfg, source.param, shapes, dtype)
        if adapters:
            hf_config = {**hf_config, HF_KEY: hf_multimodal(cfg)}
        if "value_head" in heads:                  # PPO's value head: HF has no place for it, its own file
            (n, t), = megagpt_to_hf("value_head", source.param("value_head", shapes["value_head"]), cfg)
            w = SafetensorsWriter(os.path.join(tmp, VALUE_HEAD_FILE), [(n, dtype, tuple(t.shape))], {"format": "pt"})
            w.write(n, t.to(dtype))
            w.close()
        if len(shards) > 1:
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": sum(math.prod(s) * item for _, s in plan)},
                        "weight_map": {n: files[where[n]] for n, _ in plan}})
        dname = str(dtype).removeprefix("torch.")
        # a chat model's turn ends with <|end|>: generation stops there too; padding is the eos token
        write_json(os.path.join(tmp, "config.json"), {**hf_config, "torch_dtype": dname, "dtype": dname,
                                                      "bos_token_id": eos, "eos_token_id": [eos, end] if end else eos,
                                                      "pad_token_id": eos if "reward_head" in heads else None})
        if os.path.isdir(dst):
            os.rmdir(dst)                          # empty, checked above
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    extra_files = ([ADAPTERS_FILE] if adapters else []) + ([VALUE_HEAD_FILE] if "value_head" in heads else [])
    return {"format": "hf", "files": files + extra_files, "tensors": len(plan) + len(adapters),
            "tokenizer": tokenizer, "heads": list(heads)}


# ----------------------------------------------------------------------------- -> megagpt

def _target_config(source, tp: int, pp: int, vp: int, ep: int) -> Config:
    """The source's run config (defaults for HF) in the target layout, with dp = ep (edp = 1)."""
    raw = source.config
    par = {**(raw.get("parallel") or {}), "tp": tp, "pp": pp, "vp": vp, "ep": ep, "world_size": tp * pp * ep}
    par["sequence_parallel"] = bool(par.get("sequence_parallel")) and tp > 1
    if par.get("layers_per_stage") is not None and len(par["layers_per_stage"]) != pp * vp:
        par["layers_per_stage"] = None            # the saved explicit split was for another pp*vp
    train = _known(TrainConfig, raw.get("train") or {})
    train.seq_len = min(train.seq_len, source.cfg.max_seq_len)
    cfg = Config(source.cfg, _known(ParallelConfig, par), train, _known(DataConfig, raw.get("data") or {}))
    # the batch size is the run's business, not the layout's: check the layout with one that fits any pp
    batch = train.micro_batch_size * pp * ep
    validate(dataclasses.replace(cfg, train=dataclasses.replace(train, global_batch_size=batch)))
    return cfg


def _target_ranks(cfg: Config) -> list[dict]:
    """Per target rank: its coordinates and {name: (global shape, ShardSpec, written, (piece rank, size))},
    from meta chunks. dp = ep: an expert weight is written as its EP piece by each ep rank, the rest by dp
    rank 0 (as save_checkpoint writes them)."""
    # the batch is the run's business, not the layout's: check the layout with one that fits any pp
    batch = cfg.train.micro_batch_size * cfg.parallel.pp * cfg.parallel.ep
    train = dataclasses.replace(cfg.train, global_batch_size=batch)
    layout, out = Layout.from_config(dataclasses.replace(cfg, train=train)), []
    for rank in range(layout.world_size):         # dp = ep: one rank per (tp, pp, ep) coordinate
        coords = layout.rank_coords(rank)
        chunks = meta_stage(cfg, coords["tp"], coords["pp"], layout, coords["ep"])
        params = {}
        for name, param, written in rank_params(chunks):
            meta = meta_of(param)
            one = (chunks[0].ps.edp if meta.expert else chunks[0].ps.dp).rank == 0
            spec, piece_rank, piece_size = piece_of(meta, chunks[0].ps)
            params.setdefault(name, (tuple(meta.global_shape), spec, written and one, (piece_rank, piece_size)))
        out.append({"rank": rank, "tp_rank": coords["tp"], "pp_rank": coords["pp"], "ps": chunks[0].ps,
                    "params": params})
    return out


def _write_megagpt(source, dst: str, cfg: Config, with_optimizer: bool, dtype, seed: int) -> dict:
    p, m = cfg.parallel, cfg.model
    ranks, names = _target_ranks(cfg), list(_global_shapes(m))
    fresh = source.kind == "hf"
    os.makedirs(dst, exist_ok=True)
    clean_stale(dst)
    nonce = secrets.token_hex(8)
    step, tmp = source.step, os.path.join(dst, f"{step_dir_name(source.step)}.tmp-{nonce}")
    os.makedirs(tmp)
    try:
        for r in ranks:                           # every rank file's metadata and write order (dp = 1)
            r["writer"] = Writer(tmp, step, r["rank"], len(ranks), layout_of(r["ps"], p.order), m, cfg.to_dict())
            for name in names:
                shape, spec, written, piece = r["params"].get(name, (0, 0, False, 0))
                if written:
                    tp = TPPiece.of(spec, *piece)
                    r["writer"].add_param(name, torch.float32 if _is_buffer(name) else dtype, shape, tp)
                    if with_optimizer and not _is_buffer(name):     # each rank owns its pieces' whole flat range
                        r["writer"].add_optim(name, 0, math.prod(spec.local_shape(shape, piece[1])), OPTIM_KEYS,
                                              shape, tp)
        for name in names:
            # every piece is cut from the global tensor when written and dropped right after: memory
            # holds the global tensor and one piece (each `del` frees before the next read, not after)
            holders = [r for r in ranks if r["params"].get(name, (0, 0, False))[2]]
            shape, spec, _, _ = holders[0]["params"][name]
            if _is_buffer(name):                   # state, not weights: fp32, no optimizer state
                full = source.param(name, shape).float()
                for r in holders:
                    r["writer"].write(name, full)
                continue
            full = source.param(name, shape).to(dtype)
            for r in holders:
                r["writer"].write(name, spec.shard(full, *r["params"][name][3]))
            if with_optimizer and fresh:           # a new run's state: fp32 weights, zero moments
                for r in holders:
                    r["writer"].write(f"optim/{name}/main", spec.shard(full, *r["params"][name][3]).float().reshape(-1))
                    for key in OPTIM_KEYS[1:]:
                        r["writer"].write_zeros(f"optim/{name}/{key}")
            del full
            for key in OPTIM_KEYS if with_optimizer and not fresh else ():
                g = source.optim(name, key, shape)
                for r in holders:
                    r["writer"].write(f"optim/{name}/{key}", spec.shard(g, *r["params"][name][3]).float().reshape(-1))
                del g
        if with_optimizer and not fresh:
            scalars = source.scalars               # as saved (already in the JSON encoding)
        else:
            scalars = {"step": 0, "loss_scale": cfg.train.initial_loss_scale, "growth_tracker": 0} \
                if with_optimizer else {}
        for r in ranks:
            state = (TrainState.fresh(seed, r["tp_rank"], r["pp_rank"]).state_dict() if fresh
                     else source.train_state(r["tp_rank"], r["pp_rank"]))
            r["writer"].close(scalars, state)
        write_manifest(tmp, step, len(ranks))
        publish(dst, tmp, step, nonce)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": "megagpt", "path": os.path.join(dst, step_dir_name(step)), "step": step,
            "ranks": len(ranks), "optimizer": with_optimizer}


# ----------------------------------------------------------------------------- entry point

def convert(src: str, dst: str, to: str, tp: int = 1, pp: int = 1, vp: int = 1, with_optimizer: bool = False,
            dtype: str | None = None, max_shard_size="2GB", tokenizer: str | None = None, seed: int = 1234,
            ep: int = 1) -> dict:
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
        if (tp, pp, vp, ep) != (1, 1, 1, 1) or with_optimizer:
            raise ConversionError("--tp/--pp/--vp/--ep/--with-optimizer: an HF directory has no layout or "
                                  "optimizer state")
        return _write_hf(source, dst, out_dtype, _parse_size(max_shard_size), _find_tokenizer(source.config, tokenizer))
    if source.kind == "megagpt":
        if with_optimizer and not source.has_optimizer([n for n in _global_shapes(source.cfg) if not _is_buffer(n)]):
            raise ConversionError(f"{source.dir}: has no optimizer state for every parameter; drop --with-optimizer")
        if os.path.realpath(dst) in {os.path.realpath(src), os.path.realpath(os.path.dirname(source.dir))}:
            raise ConversionError(f"{dst}: is the input's run directory (refusing to overwrite the input)")
    cfg = _target_config(source, tp, pp, vp, ep)
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
