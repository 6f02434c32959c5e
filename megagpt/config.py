"""Configuration: model, parallel layout and training, loaded from YAML with dotted overrides.

Every field is validated when the config is loaded; a bad value raises ConfigError with a
one-line message that names the field (`model.num_heads: ...`); the rules of the parallel
layout are `layout.Layout.validate`, which loading runs too (both from `config_checks.validate`).
Parameter and FLOP counts are `model_size`'s, from the config alone, so the dry run, the planner
and the model agree on them.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml



class ConfigError(ValueError):
    """A config value is wrong. The message is one line and starts with the field's dotted name."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # train.dtype -> torch
RECOMPUTE = ("none", "selective", "full")                                          # train.recompute
DP_MODES = ("ddp", "zero1", "zero2", "zero3")                                      # train.dp_mode


@dataclass
class ModelConfig:
    vocab_size: int = 64000
    max_seq_len: int = 32768
    hidden_size: int = 10240
    num_layers: int = 70
    num_heads: int = 80
    num_kv_heads: int | None = None      # None = num_heads (MHA); 1 = MQA; between = GQA
    ffn_hidden_size: int = 40960
    mlp: str = "swiglu"                  # swiglu | geglu | gelu
    norm: str = "rmsnorm"                # rmsnorm | layernorm
    norm_eps: float = 1e-5
    rotary_fraction: float = 1.0         # share of each head's dims that RoPE rotates
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0            # context-extension factor k (1 = plain RoPE); see model/rope.py
    rope_scaling_type: str = "linear"    # linear (position interpolation) | yarn; L = max_seq_len / k for yarn
    rope_interleaved: bool = False       # False: rotate-half pairs (i, i+d/2) as HF Llama; True: pairs (2i, 2i+1)
    use_flash_attn: bool = True          # flash-attn where importable on CUDA, else SDPA (same results)
    multi_query: bool = False            # shorthand for num_kv_heads = 1
    tie_embeddings: bool = False
    bias: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_window: int | None = None  # sliding window: a token attends to the w tokens ending at itself
    workspace_tokens: int = 0            # learned global workspace slots at the start (model/variants.py)
    workspace_every: int | None = None   # ... and at every multiple of this many positions
    cp_attention: str = "auto"           # CP method: auto | ring (causal, window) | allgather (any mask)
    adaptive_span: bool = False          # each head learns its span (soft ramp mask, L1 penalty)
    span_ramp: int = 32                  # the ramp's length R in tokens
    span_penalty: float = 0.0            # L1 coefficient on the mean span (tokens) per layer
    init_std: float = 0.02
    scaled_init: bool = True             # output projections get std / sqrt(2 * num_layers)
    make_vocab_divisible_by: int = 128   # the padded vocab is a multiple of this times tp
    # mixture of experts (model/moe.py): SwiGLU experts in the MLP of chosen layers; 0 experts = dense
    moe_num_experts: int = 0
    moe_layers: list | None = None       # global ids of the MoE layers; None: every moe_layer_freq-th
    moe_layer_freq: int = 1              # layers i with i % freq == 0 (when moe_layers is None)
    moe_top_k: int = 2
    moe_ffn_hidden_size: int | None = None   # each expert's width; None = ffn_hidden_size
    moe_shared_expert_size: int = 0      # width of an always-on shared SwiGLU expert; 0 = none
    moe_router_score: str = "softmax"    # softmax | sigmoid (computed in fp32)
    moe_router_norm_topk: bool = False   # renormalise the k chosen scores to sum to 1
    moe_aux_loss_coeff: float = 0.0      # Switch/GShard load-balancing loss
    moe_z_loss_coeff: float = 0.0        # router z-loss
    moe_capacity_factor: float | None = None   # None = dropless; else drop the lowest-probability overflow
    moe_router_bias_rate: float = 0.0    # > 0: auxiliary-loss-free balancing, a selection bias moved by this per step
    # mixture of depths (model/mod.py): on these layers a router keeps mod_capacity of each sequence
    mod_layers: list | None = None
    mod_capacity: float = 0.125
    # multimodal adapters (megagpt/multimodal/): a placeholder id turns its adapter on, on the first stage
    image_token_id: int | None = None    # the <image> id (spec.add_media_tokens): a ViT adapter for 8x8 images
    audio_token_id: int | None = None    # the <audio> id: a log-mel + conv subsampler adapter
    adapter_hidden: int = 64             # the adapters' encoder width (a multiple of 4, the ViT's heads)
    adapter_layers: int = 2              # the vision encoder's transformer layers

    @property
    def kv_heads(self) -> int:
        if self.multi_query:
            return 1
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rope_original_len(self) -> int:
        """The trained context L that the scaling extends: max_seq_len / rope_scaling."""
        return max(1, round(self.max_seq_len / self.rope_scaling))

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    def is_moe_layer(self, i: int) -> bool:
        if self.moe_num_experts <= 0:
            return False
        return i in self.moe_layers if self.moe_layers is not None else i % self.moe_layer_freq == 0

    @property
    def expert_ffn(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def kv_heads_per_rank(self, tp: int) -> int:
        """K/V heads on one TP rank: split by whole heads, or one (replicated) when fewer than tp."""
        return self.kv_heads // tp if self.kv_heads >= tp else 1

    def padded_vocab(self, tp: int = 1) -> int:
        multiple = self.make_vocab_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vp: int = 1                          # virtual pipeline stages (model chunks) per pp rank
    cp: int = 1
    ep: int = 1
    world_size: int | None = None        # None = from the launcher; dp = world / (tp * cp * pp) (layout.py)
    sequence_parallel: bool = False
    order: str = "tp-cp-ep-dp-pp"
    layers_per_stage: list | None = None  # explicit split: one count per pp * vp chunk
    distributed_optimizer: bool = True
    bucket_size_mb: float = 25.0         # under glibc's 32 MiB mmap ceiling (a bigger CPU bucket page-faults every step); torch DDP's default
    overlap_param_gather: bool = True     # ZeRO-1: the params' all-gather overlaps the next forward


@dataclass
class TrainConfig:
    seq_len: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    dtype: str = "fp32"                  # fp32 | bf16 | fp16
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: float = 0.01                 # < 1: a fraction of train_iters; >= 1: a number of steps
    decay_style: str = "cosine"          # cosine | linear | polynomial | constant
    decay_power: float = 1.0             # for polynomial decay
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    initial_loss_scale: float = 2.0 ** 16
    loss_scale_window: int = 1000        # fp16: grow the scale after this many good steps
    min_loss_scale: float = 1.0
    recompute: str = "none"              # none | selective | full
    recompute_num_layers: int | None = None  # full: how many layers per chunk (None = all)
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 50
    eval_iters: int = 4
    save_interval: int = 0
    keep_checkpoints: int = 2
    peak_tflops: float | None = None     # per device, for MFU; null: the GPU's (model_size.device_peak_tflops),
                                         # none on the CPU (MFU n/a)
    schedule: str = "1f1b"               # gpipe | 1f1b | interleaved (1f1b is interleaved when vp > 1)
    dp_mode: str = "zero1"               # ddp | zero1 (optimizer state sharded) | zero2 (+ grads) | zero3 (+ params)
    compile: bool = False                # torch.compile each transformer block (model/compile.py)
    grad_accum_fusion: bool = True       # linear weight grads added straight into the fp32 grad buffer (ddp/zero1, fp32)
    malloc_tuning: bool = True           # CPU on Linux/glibc: raise malloc's mmap/trim thresholds (malloc_tuning.py)
    freeze_lm: bool = False              # train the multimodal adapters only: the decoder is frozen (no optimizer state)


@dataclass
class DataConfig:
    path: str | None = None              # prefix of a .bin/.idx pair, or None for synthetic tokens
    blend: list | None = None            # [weight, prefix, weight, prefix, ...]
    split: list = field(default_factory=lambda: [98, 1, 1])
    tokenizer: str | None = None         # tokenizer.json, for generation and conversion
    curriculum: list | None = None       # [[step, w_1, ..., w_k], ...]: blend weights, linear between (data/curriculum.py)
    seq_len_warmup: list | None = None   # [start_length, steps]: sequence length grows to train.seq_len


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig}


# ----------------------------------------------------------------------------- loading

def _check_type(name: str, value, annotation: str):
    """Coerce value to the field's declared type or raise a one-line ConfigError."""
    allow_none = "None" in annotation
    if value is None:
        if allow_none:
            return None
        raise ConfigError(f"{name}: expected {annotation.replace(' | None', '')}, got null")
    base = annotation.replace(" | None", "").strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base == "list":
        if isinstance(value, list):
            return value
    raise ConfigError(f"{name}: expected {base}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if key not in known:
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _check_type(name, value, str(known[key].type))
    return cls(**kwargs)


def _parse_scalar(text: str):
    """An override's value is read as YAML, so `true`, `3`, `1e-4` and `[1,2]` mean what they look like."""
    return yaml.safe_load(text)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like section.field=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(f"{key}: an override must name section.field with section in {sorted(_SECTIONS)}")
        raw.setdefault(parts[0], {})[parts[1]] = _parse_scalar(text)
    return raw


def overlay_overrides(path: str | Path) -> list[str]:
    """A YAML overlay (section: {field: value}) as dotted overrides, applied after the base config:
    e.g. examples/configs/extend-context-4x.yaml on any config."""
    raw = load_raw(path)
    if not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"{path}: an overlay maps sections to fields (model: {{max_seq_len: 1024}})")
    return [f"{sec}.{k}={json.dumps(v)}" for sec, fields_ in raw.items() for k, v in fields_.items()]


def config_from_dict(raw: dict, world_size: int | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(_SECTIONS)})")
    cfg = Config(**{name: _build(cls, raw.get(name, {}) or {}, name) for name, cls in _SECTIONS.items()})
    if world_size is not None:
        cfg.parallel.world_size = world_size
    from .config_checks import validate     # the rules live there; they need the classes above
    validate(cfg)
    return cfg


def load_raw(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The YAML file with the dotted overrides applied, before defaults: what the user wrote."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return apply_overrides(raw, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    return config_from_dict(load_raw(path, overrides), world_size)


# ----------------------------------------------------------------------------- validation

def dp_mode(t: TrainConfig, p: ParallelConfig) -> str:
    """The data-parallel mode that runs: train.dp_mode, except that parallel.distributed_optimizer
    false (its older spelling of ddp) means ddp."""
    return t.dp_mode if p.distributed_optimizer else "ddp"


def check_choice(name, value, options):
    if value not in options:
        raise ConfigError(f"{name}: expected one of {', '.join(options)}, got {value!r}")


def vocab_padding_note(m: ModelConfig, tp: int) -> str | None:
    """Padding is done, and reported: never silent."""
    padded = m.padded_vocab(tp)
    if padded == m.vocab_size:
        return None
    return (f"vocab padded from {m.vocab_size} to {padded} "
            f"(a multiple of make_vocab_divisible_by*tp = {m.make_vocab_divisible_by}*{tp}); "
            f"the {padded - m.vocab_size} extra logits are masked out of the loss")
