"""A model for inference from a checkpoint directory: megagpt (any saved layout, resharded on load through
`checkpoint.sharded.load_checkpoint`) or HF Llama (`checkpoint.hf.load_hf_into_model`), built in the layout
asked for (tp x pp, sequence parallelism off; DP is whatever the launcher's world size leaves).
Every way this can fail is a one-line error naming the field or the path."""
from __future__ import annotations

import os

import torch

from .checkpoint.convert import _find_tokenizer, open_source
from .checkpoint.hf import ConversionError, load_hf_into_model, open_hf_checkpoint
from .checkpoint.sharded import load_checkpoint
from .checkpoint.store import CheckpointError
from .config import Config, ConfigError, ParallelConfig, TrainConfig
from .config_checks import validate
from .parallel.state import ParallelState, init_distributed
from .data.indexed import DataError
from .pipeline.split import build_stage

# What the inference tools (generate, serve, rag, evaluate) report as one line of bad input, not a traceback.
INPUT_ERRORS = (ValueError, ConfigError, CheckpointError, ConversionError, DataError, OSError)


def inference_config(model_cfg, tp: int, pp: int, world_size: int) -> Config:
    """The layout tp x pp (dp = the rest of the world) for this model, validated: a layout the checkpoint
    cannot be resharded to (heads, KV heads, FFN not divisible by tp; fewer layers than pp) is a ConfigError."""
    dp = max(1, world_size // (tp * pp))          # the batch size only has to fit the layout; generation sets its own
    cfg = Config(model=model_cfg, parallel=ParallelConfig(tp=tp, pp=pp, world_size=world_size),
                 train=TrainConfig(seq_len=model_cfg.max_seq_len, micro_batch_size=1, global_batch_size=pp * dp))
    validate(cfg)
    return cfg


def load_for_generation(path: str, tp: int = 1, pp: int = 1, tokenizer: str | None = None, seed: int = 0):
    """(this rank's chunks, ParallelState, Tokenizer or None, eod id or None). Under torchrun (WORLD_SIZE
    set) it starts torch.distributed; a plain process runs tp = pp = 1 without it."""
    from .data.tokenizer import Tokenizer
    if not os.path.isdir(path):
        raise CheckpointError(f"--load: {path}: no such checkpoint directory")
    source = open_source(path)                        # HF (config.json) or megagpt (a complete manifest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = inference_config(source.cfg, tp, pp, world if world > 1 else tp * pp)
    if world == 1 and tp * pp > 1:
        raise ConfigError(f"parallel: tp*pp={tp}*{pp} needs {tp * pp} ranks; launch with torchrun "
                          f"--nproc-per-node {tp * pp}")
    if world > 1:
        init_distributed()
        ps = ParallelState.create(tp=tp, pp=pp)
    else:
        ps = ParallelState.single()
    chunks = build_stage(cfg, ps, seed, dtype=torch.float32)
    if source.kind == "hf":
        hf_config, get_tensor, close = open_hf_checkpoint(path)
        from .multimodal.hf_adapters import load_adapters_into
        for c in chunks:
            load_hf_into_model(c, get_tensor, hf_config)
            load_adapters_into(c, path)                   # a multimodal export's adapters.safetensors, if any
        close()
        found = os.path.join(path, "tokenizer.json")
        tok_path = tokenizer or (found if os.path.isfile(found) else None)
        eod = hf_config.get("eos_token_id")
    else:
        load_checkpoint(source.dir, chunks, ps, cfg, verify=False)       # open_source verified every file
        tok_path, eod = _find_tokenizer(source.config, tokenizer), None
    tok = Tokenizer.load(tok_path) if tok_path else None
    if tok is not None:
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"--tokenizer: {tok.vocab_size} tokens, more than model.vocab_size={cfg.model.vocab_size}")
        eod = tok.eod_id
    return chunks, ps, tok, eod if isinstance(eod, int) else None


def save_for_inference(run_dir: str, model, tokenizer_path: str | None = None, step: int = 1) -> None:
    """A one-process model (tp = pp = 1) saved as a megagpt checkpoint that `load_for_generation` reads
    back, naming its tokenizer.json (data.tokenizer) when one is given."""
    from .checkpoint.sharded import save_checkpoint
    from .config import DataConfig
    cfg = Config(model=model.cfg, parallel=ParallelConfig(world_size=1),
                 data=DataConfig(tokenizer=os.path.abspath(tokenizer_path) if tokenizer_path else None),
                 train=TrainConfig(seq_len=model.cfg.max_seq_len, micro_batch_size=1, global_batch_size=1))
    save_checkpoint(run_dir, step, [model], ParallelState.single(), cfg, {})
