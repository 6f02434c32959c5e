"""The rules a loaded config must satisfy: each field's range and choices, the combinations of model
features, and (through `layout.Layout.validate`) the parallel layout. `config.config_from_dict`
runs `validate` on every load, so a bad value stops the job before any work with one line naming
the field (`model.num_heads: ...`)."""
from __future__ import annotations

import math

from .config import DP_MODES, DTYPES, RECOMPUTE, Config, ConfigError, ModelConfig, TrainConfig, check_choice
from .model.rope import SCALING_TYPES


def _positive(name, value):
    if value is None or value <= 0:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")


def validate(cfg: Config) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for f in ("vocab_size", "max_seq_len", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
        _positive(f"model.{f}", getattr(m, f))
    check_choice("model.mlp", m.mlp, ("swiglu", "geglu", "gelu"))
    check_choice("model.norm", m.norm, ("rmsnorm", "layernorm"))
    check_choice("train.dtype", t.dtype, tuple(DTYPES))
    check_choice("train.decay_style", t.decay_style, ("cosine", "linear", "polynomial", "constant"))
    check_choice("train.recompute", t.recompute, RECOMPUTE)
    check_choice("train.dp_mode", t.dp_mode, DP_MODES)
    if t.dp_mode in ("zero2", "zero3") and not p.distributed_optimizer:
        raise ConfigError(f"train.dp_mode: {t.dp_mode} shards the optimizer state, but parallel.distributed_optimizer "
                          f"is false (use dp_mode ddp, or set it true)")
    if t.dp_mode == "zero3" and p.ep > 1:
        raise ConfigError(f"train.dp_mode: zero3 is not supported with parallel.ep={p.ep} "
                          f"(it composes with tp, cp and pp)")
    if t.dp_mode in ("zero2", "zero3") and (m.moe_num_experts or m.mod_layers):
        raise ConfigError(f"train.dp_mode: {t.dp_mode} is not supported with mixture of experts/depths "
                          f"(model.moe_num_experts, model.mod_layers) yet; use zero1 or ddp")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size: {m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.num_kv_heads is not None and m.num_kv_heads <= 0:
        raise ConfigError(f"model.num_kv_heads: expected a positive number, got {m.num_kv_heads}")
    if m.num_heads % m.kv_heads:
        raise ConfigError(f"model.num_kv_heads: {m.kv_heads} does not divide model.num_heads={m.num_heads}")
    if not 0.0 < m.rotary_fraction <= 1.0:
        raise ConfigError(f"model.rotary_fraction: expected 0 < fraction <= 1, got {m.rotary_fraction}")
    rot = int(m.head_dim * m.rotary_fraction)
    if rot % 2:
        raise ConfigError(f"model.rotary_fraction: rotates {rot} dims of {m.head_dim}; needs an even number")
    check_choice("model.rope_scaling_type", m.rope_scaling_type, SCALING_TYPES)
    if m.rope_scaling != 1.0 and not m.rope_scaling > 1.0:
        raise ConfigError(f"model.rope_scaling: expected a factor > 1 (context extension; 1 = no scaling), "
                          f"got {m.rope_scaling}")
    if m.rope_scaling_type != "linear" and m.rope_scaling == 1.0:
        raise ConfigError(f"model.rope_scaling: rope_scaling_type={m.rope_scaling_type} needs a factor > 1, got 1")
    for f in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, f) < 1.0:
            raise ConfigError(f"model.{f}: expected 0 <= p < 1, got {getattr(m, f)}")
    _positive("model.init_std", m.init_std)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.make_vocab_divisible_by", m.make_vocab_divisible_by)
    _validate_moe(m)
    _validate_media(m, t)
    if p.sequence_parallel and p.tp == 1:
        p.sequence_parallel = False  # nothing to shard over; as Megatron, SP is switched off for tp=1
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.attention_window is not None and not 1 <= m.attention_window <= t.seq_len:
        raise ConfigError(f"model.attention_window: expected 1 <= window <= train.seq_len={t.seq_len}, got "
                          f"{m.attention_window} (leave it unset for full causal attention)")
    _validate_variants(m, t.seq_len)
    from .layout import Layout  # the layout's rules live beside this file, and read ModelConfig from it
    Layout.from_config(cfg)
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: {t.min_lr} is above train.lr={t.lr}")
    if t.warmup < 0:
        raise ConfigError(f"train.warmup: expected >= 0, got {t.warmup}")
    if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1):
        raise ConfigError(f"train.adam_beta1: betas must lie in [0, 1), got {t.adam_beta1}, {t.adam_beta2}")
    _validate_counts(cfg)
    if t.compile:
        from .model.compile import compile_problem
        problem = compile_problem(m, t)
        if p.cp > 1:                                     # the ring's autograd Function is not traced through yet
            problem = f"train.compile: true is not supported with parallel.cp={p.cp} > 1 yet"
        if problem:
            raise ConfigError(problem)
    _validate_curriculum(cfg)


def _validate_variants(m: ModelConfig, seq_len: int) -> None:
    """Workspace tokens, adaptive span and the CP attention method (model/variants.py)."""
    from .model.variants import CP_METHODS, loss_tokens
    if m.cp_attention not in CP_METHODS:
        raise ConfigError(f"model.cp_attention: expected one of {', '.join(CP_METHODS)}, got {m.cp_attention!r}")
    if not 0 <= m.workspace_tokens < seq_len:
        raise ConfigError(f"model.workspace_tokens: expected 0 <= n < train.seq_len={seq_len}, got {m.workspace_tokens}")
    if m.workspace_every is not None:
        if not m.workspace_tokens:
            raise ConfigError("model.workspace_every: needs model.workspace_tokens > 0")
        if not m.workspace_tokens < m.workspace_every <= seq_len:
            raise ConfigError(f"model.workspace_every: expected workspace_tokens={m.workspace_tokens} < k <= "
                              f"train.seq_len={seq_len}, got {m.workspace_every}")
    if m.workspace_tokens and loss_tokens(m, seq_len) < 1:
        raise ConfigError("model.workspace_tokens: no text slot is left in train.seq_len")
    if m.adaptive_span:
        if m.workspace_tokens or m.attention_window is not None:
            raise ConfigError("model.adaptive_span: not combined with model.attention_window or "
                              "model.workspace_tokens (the span is the head's own window)")
        if m.span_ramp < 1:
            raise ConfigError(f"model.span_ramp: expected a positive number of tokens, got {m.span_ramp}")
        if m.span_penalty < 0:
            raise ConfigError(f"model.span_penalty: expected >= 0, got {m.span_penalty}")


def _validate_media(m: ModelConfig, t: TrainConfig) -> None:
    """The multimodal adapters' fields (megagpt/multimodal/adapters.py)."""
    ids = [(f, getattr(m, f)) for f in ("image_token_id", "audio_token_id") if getattr(m, f) is not None]
    for f, tid in ids:
        if isinstance(tid, bool) or not 0 <= tid < m.vocab_size:
            raise ConfigError(f"model.{f}: expected a token id in [0, model.vocab_size={m.vocab_size}), got {tid!r}")
    if len(ids) == 2 and ids[0][1] == ids[1][1]:
        raise ConfigError(f"model.audio_token_id: {ids[1][1]} is also model.image_token_id (one id per medium)")
    if m.adapter_hidden < 4 or m.adapter_hidden % 4:
        raise ConfigError(f"model.adapter_hidden: expected a positive multiple of 4 (the ViT's heads), got {m.adapter_hidden}")
    if m.adapter_layers < 0:
        raise ConfigError(f"model.adapter_layers: expected >= 0, got {m.adapter_layers}")
    if t.freeze_lm and not ids:
        raise ConfigError("train.freeze_lm: true trains the adapters only, but none is on "
                          "(set model.image_token_id or model.audio_token_id)")


def _validate_curriculum(cfg: Config) -> None:
    from .data.curriculum import check_curriculum, check_seq_len_warmup
    d, p = cfg.data, cfg.parallel
    try:
        if d.curriculum is not None:
            if not d.blend:
                raise ValueError("data.curriculum: needs data.blend (the datasets whose weights it schedules)")
            check_curriculum(d.curriculum, len(d.blend) // 2)
        if d.seq_len_warmup is not None:
            check_seq_len_warmup(d.seq_len_warmup, cfg.train.seq_len)
            if p.pp > 1:
                raise ValueError(f"data.seq_len_warmup: needs parallel.pp=1 (the pipeline's activation shape is "
                                 f"fixed), got pp={p.pp}")
            if d.seq_len_warmup[0] % (p.tp * p.cp) or cfg.train.seq_len % (p.tp * p.cp):
                raise ValueError(f"data.seq_len_warmup: start {d.seq_len_warmup[0]} must be a multiple of "
                                 f"tp*cp={p.tp * p.cp}")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _layer_list(name: str, ids, num_layers: int) -> None:
    if ids is None:
        return
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{name}: layer ids must lie in [0, model.num_layers={num_layers}), got {bad[0]!r}")


def _validate_moe(m: ModelConfig) -> None:
    """Mixture of experts and of depths: the one-line errors of the issue (#13)."""
    if m.moe_num_experts < 0:
        raise ConfigError(f"model.moe_num_experts: expected >= 0 (0 = dense), got {m.moe_num_experts}")
    _layer_list("model.moe_layers", m.moe_layers, m.num_layers)
    _layer_list("model.mod_layers", m.mod_layers, m.num_layers)
    if m.moe_num_experts:
        if not 1 <= m.moe_top_k <= m.moe_num_experts:
            raise ConfigError(f"model.moe_top_k: expected 1 <= top-k <= model.moe_num_experts="
                              f"{m.moe_num_experts}, got {m.moe_top_k}")
        if m.moe_layer_freq < 1:
            raise ConfigError(f"model.moe_layer_freq: expected >= 1, got {m.moe_layer_freq}")
        check_choice("model.moe_router_score", m.moe_router_score, ("softmax", "sigmoid"))
        if m.moe_capacity_factor is not None and not (m.moe_capacity_factor > 0 and math.isfinite(m.moe_capacity_factor)):
            raise ConfigError(f"model.moe_capacity_factor: expected a finite number > 0 (or null for dropless), "
                              f"got {m.moe_capacity_factor}")
        for f in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_shared_expert_size", "moe_router_bias_rate"):
            if not getattr(m, f) >= 0:
                raise ConfigError(f"model.{f}: expected >= 0, got {getattr(m, f)!r}")
        if m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size < 1:
            raise ConfigError(f"model.moe_ffn_hidden_size: expected a positive integer, got {m.moe_ffn_hidden_size}")
    if m.mod_layers and not 0.0 < m.mod_capacity <= 1.0:
        raise ConfigError(f"model.mod_capacity: expected 0 < fraction <= 1, got {m.mod_capacity}")


# (section.field, the smallest valid value) of counts, intervals (0 = never) and rates
_AT_LEAST = (("train.train_iters", 1), ("train.log_interval", 1), ("train.eval_interval", 0),
             ("train.eval_iters", 0), ("train.save_interval", 0), ("train.keep_checkpoints", 0),
             ("train.seed", 0), ("train.loss_scale_window", 1), ("train.lr", 0.0), ("train.min_lr", 0.0),
             ("train.weight_decay", 0.0), ("train.clip_grad", 0.0), ("train.adam_eps", 0.0))
_POSITIVE = ("train.initial_loss_scale", "train.min_loss_scale", "train.peak_tflops", "train.decay_power",
             "parallel.bucket_size_mb")
_NULL_ALLOWED = ("train.peak_tflops",)      # null: the device's own peak (model_size.device_peak_tflops)


def _validate_counts(cfg: Config) -> None:
    """Nonsense numbers (`--train-iters -5`, a negative interval) fail here, before any work."""
    def get(name):
        section, key = name.split(".")
        return getattr(getattr(cfg, section), key)
    for name, low in _AT_LEAST:
        if not get(name) >= low:  # `not >=` also refuses NaN
            raise ConfigError(f"{name}: expected >= {low}, got {get(name)!r}")
    for name in _POSITIVE:
        if get(name) is None and name in _NULL_ALLOWED:
            continue
        if not get(name) > 0:
            raise ConfigError(f"{name}: expected a positive number, got {get(name)!r}")
    t = cfg.train
    if t.eval_interval and t.eval_iters < 1:
        raise ConfigError(f"train.eval_iters: expected >= 1 when train.eval_interval={t.eval_interval} "
                          f"(0 turns evaluation off), got {t.eval_iters}")
    if t.recompute_num_layers is not None and t.recompute_num_layers < 1:
        raise ConfigError(f"train.recompute_num_layers: expected >= 1 (or null for all), got {t.recompute_num_layers}")
