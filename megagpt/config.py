"""Configuration: model, parallel layout and training, loaded from YAML with dotted overrides.

Every field is validated when the config is loaded; a bad value raises ConfigError with a
one-line message that names the field (`model.num_heads: ...`). Derived figures (parameter
count, FLOPs per token, padded vocab) are computed here from the config alone, so the dry
run, the planner and the model agree on them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config value is wrong. The message is one line and starts with the field's dotted name."""


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
    rope_scaling: float = 1.0            # linear position interpolation: positions are divided by this
    rope_interleaved: bool = False       # False: rotate-half pairs (i, i+d/2) as HF Llama; True: pairs (2i, 2i+1)
    use_flash_attn: bool = True          # flash-attn where importable on CUDA, else SDPA (same results)
    multi_query: bool = False            # shorthand for num_kv_heads = 1
    tie_embeddings: bool = False
    bias: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    scaled_init: bool = True             # output projections get std / sqrt(2 * num_layers)
    make_vocab_divisible_by: int = 128   # the padded vocab is a multiple of this times tp

    @property
    def kv_heads(self) -> int:
        if self.multi_query:
            return 1
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

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
    world_size: int | None = None        # None = from the launcher; dp = world / (tp * cp * pp)
    sequence_parallel: bool = False
    order: str = "tp-cp-ep-dp-pp"
    layers_per_stage: list | None = None  # explicit split: one count per pp * vp chunk
    distributed_optimizer: bool = True
    bucket_size_mb: float = 40.0
    overlap_param_gather: bool = True     # ZeRO-1: the params' all-gather overlaps the next forward

    def dp(self, world_size: int | None = None) -> int:
        world = world_size if world_size is not None else self.world_size
        if world is None:
            return 1
        return world // (self.tp * self.cp * self.pp)


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
    peak_tflops: float = 989.0           # per device, for MFU
    schedule: str = "1f1b"               # gpipe | 1f1b (interleaved when vp > 1)


@dataclass
class DataConfig:
    path: str | None = None              # prefix of a .bin/.idx pair, or None for synthetic tokens
    blend: list | None = None            # [weight, prefix, weight, prefix, ...]
    split: list = field(default_factory=lambda: [98, 1, 1])
    tokenizer: str | None = None         # tokenizer.json, for generation and conversion


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


def config_from_dict(raw: dict, world_size: int | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(_SECTIONS)})")
    cfg = Config(**{name: _build(cls, raw.get(name, {}) or {}, name) for name, cls in _SECTIONS.items()})
    if world_size is not None:
        cfg.parallel.world_size = world_size
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, world_size)


# ----------------------------------------------------------------------------- validation

def _choice(name, value, options):
    if value not in options:
        raise ConfigError(f"{name}: expected one of {', '.join(options)}, got {value!r}")


def _positive(name, value):
    if value is None or value <= 0:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")


def validate(cfg: Config) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for f in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
        _positive(f"model.{f}", getattr(m, f))
    for f in ("tp", "pp", "vp", "cp", "ep"):
        _positive(f"parallel.{f}", getattr(p, f))
    _choice("model.mlp", m.mlp, ("swiglu", "geglu", "gelu"))
    _choice("model.norm", m.norm, ("rmsnorm", "layernorm"))
    _choice("train.dtype", t.dtype, ("fp32", "bf16", "fp16"))
    _choice("train.decay_style", t.decay_style, ("cosine", "linear", "polynomial", "constant"))
    _choice("train.recompute", t.recompute, ("none", "selective", "full"))
    _choice("train.schedule", t.schedule, ("gpipe", "1f1b"))
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_kv_heads is not None and m.num_kv_heads <= 0:
        raise ConfigError(f"model.num_kv_heads: expected a positive number, got {m.num_kv_heads}")
    if m.num_heads % m.kv_heads:
        raise ConfigError(f"model.num_kv_heads: {m.kv_heads} does not divide model.num_heads={m.num_heads}")
    if m.num_heads % p.tp:
        raise ConfigError(f"model.num_heads: {m.num_heads} is not divisible by parallel.tp={p.tp}")
    kv = m.kv_heads
    if kv % p.tp and p.tp % kv:
        raise ConfigError(f"model.num_kv_heads: {kv} KV heads can be neither split nor replicated over parallel.tp={p.tp}")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size: {m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}")
    if not 0.0 < m.rotary_fraction <= 1.0:
        raise ConfigError(f"model.rotary_fraction: expected 0 < fraction <= 1, got {m.rotary_fraction}")
    rot = int(m.head_dim * m.rotary_fraction)
    if rot % 2:
        raise ConfigError(f"model.rotary_fraction: rotates {rot} dims of {m.head_dim}; needs an even number")
    if m.rope_scaling < 1.0:
        raise ConfigError(f"model.rope_scaling: expected >= 1 (a position-interpolation factor), got {m.rope_scaling}")
    for f in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, f) < 1.0:
            raise ConfigError(f"model.{f}: expected 0 <= p < 1, got {getattr(m, f)}")
    _positive("model.init_std", m.init_std)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.make_vocab_divisible_by", m.make_vocab_divisible_by)
    if p.cp != 1 or p.ep != 1:
        raise ConfigError("parallel.cp: context and expert parallelism are not implemented yet; use cp=1, ep=1")
    dims = p.order.split("-")
    if sorted(dims) != sorted(["tp", "cp", "ep", "dp", "pp"]):
        raise ConfigError(f"parallel.order: expected a permutation of tp-cp-ep-dp-pp, got {p.order!r}")
    if p.world_size is not None:
        _positive("parallel.world_size", p.world_size)
        if p.world_size % (p.tp * p.cp * p.pp):
            raise ConfigError(f"parallel.world_size: {p.world_size} is not divisible by tp*cp*pp="
                              f"{p.tp}*{p.cp}*{p.pp}={p.tp * p.cp * p.pp}")
    chunks = p.pp * p.vp
    if p.layers_per_stage is not None:
        if len(p.layers_per_stage) != chunks or any(not isinstance(n, int) or n < 0 for n in p.layers_per_stage):
            raise ConfigError(f"parallel.layers_per_stage: expected {chunks} non-negative integers (pp*vp), "
                              f"got {p.layers_per_stage}")
        if sum(p.layers_per_stage) != m.num_layers:
            raise ConfigError(f"parallel.layers_per_stage: sums to {sum(p.layers_per_stage)}, "
                              f"but model.num_layers={m.num_layers}")
    elif m.num_layers < chunks:  # uneven splits are fine (the pipeline balances them); empty chunks are not
        raise ConfigError(f"parallel.pp: {m.num_layers} layers are fewer than pp*vp={chunks} chunks")
    if p.vp > 1 and p.pp == 1:
        raise ConfigError("parallel.vp: virtual stages need parallel.pp > 1")
    if p.sequence_parallel and p.tp == 1:
        p.sequence_parallel = False  # nothing to shard over; as Megatron, SP is switched off for tp=1
    _positive("train.seq_len", t.seq_len)
    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.global_batch_size", t.global_batch_size)
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if p.sequence_parallel and t.seq_len % p.tp:
        raise ConfigError(f"train.seq_len: {t.seq_len} is not divisible by parallel.tp={p.tp} (sequence parallel)")
    dp = p.dp()
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"micro_batch_size*dp={t.micro_batch_size}*{dp}")
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.pp > 1 and microbatches < p.pp:
        raise ConfigError(f"train.global_batch_size: gives {microbatches} microbatches per pipeline, "
                          f"fewer than parallel.pp={p.pp}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} is above train.lr={t.lr}")
    if t.warmup < 0:
        raise ConfigError(f"train.warmup: expected >= 0, got {t.warmup}")
    if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1):
        raise ConfigError(f"train.adam_beta1: betas must lie in [0, 1), got {t.adam_beta1}, {t.adam_beta2}")


def vocab_padding_note(m: ModelConfig, tp: int) -> str | None:
    """Padding is done, and reported: never silent."""
    padded = m.padded_vocab(tp)
    if padded == m.vocab_size:
        return None
    return (f"vocab padded from {m.vocab_size} to {padded} "
            f"(a multiple of make_vocab_divisible_by*tp = {m.make_vocab_divisible_by}*{tp}); "
            f"the {padded - m.vocab_size} extra logits are masked out of the loss")


# ----------------------------------------------------------------------------- derived figures

def layer_params(m: ModelConfig) -> int:
    h, d = m.hidden_size, m.head_dim
    qkv = h * (m.num_heads + 2 * m.kv_heads) * d
    proj = m.num_heads * d * h
    mlp = (3 if m.gated else 2) * h * m.ffn_hidden_size
    norms = 2 * h * (2 if m.norm == "layernorm" else 1)
    if m.bias:
        qkv_b = (m.num_heads + 2 * m.kv_heads) * d
        mlp_b = (2 if m.gated else 1) * m.ffn_hidden_size + h
        norms += qkv_b + h + mlp_b
    return qkv + proj + mlp + norms


def embedding_params(m: ModelConfig, tp: int = 1) -> int:
    return m.padded_vocab(tp) * m.hidden_size if tp > 1 else m.vocab_size * m.hidden_size


def final_norm_params(m: ModelConfig) -> int:
    return m.hidden_size * (2 if m.norm == "layernorm" else 1)


def count_params(m: ModelConfig) -> int:
    """Parameters of the unpadded, unsharded model (what a paper would quote)."""
    emb = m.vocab_size * m.hidden_size
    return m.num_layers * layer_params(m) + emb * (1 if m.tie_embeddings else 2) + final_norm_params(m)


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls and attention scores."""
    h, d = m.hidden_size, m.head_dim
    per_layer = 2 * (h * (m.num_heads + 2 * m.kv_heads) * d + m.num_heads * d * h
                     + (3 if m.gated else 2) * h * m.ffn_hidden_size)
    attn = 2 * 2 * m.num_heads * d * seq_len / 2  # QK^T and PV over a causal half
    logits = 2 * h * m.vocab_size
    return 3.0 * (m.num_layers * (per_layer + attn) + logits)


def split_layers(num_layers: int, chunks: int, explicit: list | None = None) -> list[list[int]]:
    """Global layer ids of each model chunk (chunk c lives on pp rank c % pp)."""
    if explicit is not None:
        counts = list(explicit)
    else:
        base, extra = divmod(num_layers, chunks)
        # the remainder goes to the middle chunks: the first and last also carry the embedding and the head
        order = sorted(range(chunks), key=lambda c: (c in (0, chunks - 1), c))
        counts = [base] * chunks
        for c in order[:extra]:
            counts[c] += 1
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    assert start == num_layers
    return out
