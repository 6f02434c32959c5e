"""Learning-rate schedule: linear warm-up, then cosine / linear / polynomial / constant decay to min_lr.

`step` is the 0-based index of the optimizer step about to run. Internally the count is 1-based
(as Megatron's): warm-up gives lr * (step + 1) / warmup, so the first step is not wasted at lr 0
and step warmup - 1 runs at the peak lr; decay then goes from lr to min_lr, reached by the last
step (train_iters - 1) and held after it.
"""
from __future__ import annotations

import math

from ..config import TrainConfig


def warmup_steps(cfg: TrainConfig) -> int:
    """warmup < 1: a fraction of train_iters; >= 1: a number of steps."""
    return int(round(cfg.warmup * cfg.train_iters)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    it, warm = step + 1, warmup_steps(cfg)
    if it <= warm:
        return cfg.lr * it / warm
    if cfg.decay_style == "constant":
        return cfg.lr
    decay = cfg.train_iters - warm
    if decay <= 0 or it >= cfg.train_iters:
        return cfg.min_lr
    progress = (it - warm) / decay                     # in (0, 1): how far into the decay
    if cfg.decay_style == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.decay_style == "linear":
        f = 1.0 - progress
    elif cfg.decay_style == "polynomial":
        f = (1.0 - progress) ** cfg.decay_power
    else:
        raise ValueError(f"train.decay_style: expected cosine, linear, polynomial or constant, "
                         f"got {cfg.decay_style!r}")
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * f
