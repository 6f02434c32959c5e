"""The optimizer side of training.

    optimizer.py    Optimizer / build_optimizer: what the training loop calls each step
    grad_buffer.py  the contiguous fp32 gradient buffer, its buckets and DP reductions
    adamw.py        the update rules: ZeRO-1 ShardedAdamW and PlainAdamW, the parameter all-gather
    clip.py         global gradient norm and clipping
    scaler.py       dynamic loss scaling (fp16)
    lr.py           the learning-rate schedule
"""
from .lr import lr_at, warmup_steps
from .optimizer import DTYPES, Optimizer, build_optimizer

__all__ = ["DTYPES", "Optimizer", "build_optimizer", "lr_at", "warmup_steps"]
