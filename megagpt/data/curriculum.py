"""Curricula: blend weights that change with the step, and a sequence-length warm-up.

data.curriculum: knots [[step, w_1, ..., w_k], ...], one weight per data.blend dataset, steps strictly
increasing. The weights at step s are interpolated linearly between the knots around s and held
constant before the first and after the last; each row is normalized (its weights must sum to a
positive number). Sample i of the run belongs to step i // global_batch, so its weights are those of
that step.

The assignment is blend.py's greedy rule with a moving target: sample i goes to the dataset furthest
behind its cumulative share, target_d(i) = sum over samples j <= i of w_d(step(j)). Every prefix
then tracks the integral of the schedule to about one sample, so every window of samples holds each
dataset's scheduled share to within two. It is a function of the sample index alone, computed
for all samples at once: a resume at `consumed_samples` reads exactly the samples the uninterrupted
run would have read, while the weights change.

data.seq_len_warmup: [start, steps]: the sequence length of step s is start + (seq_len - start) * s /
steps, rounded down to a multiple of `multiple` (the TP x CP degree, so SP and CP can split it) and
at least start, then seq_len from step `steps` on. Each sample is still built at seq_len and its
first L+1 tokens are used (the Megatron-DeepSpeed "seqlen" curriculum: truncation), so the data and
its order do not depend on the warm-up either.
"""
from __future__ import annotations

import numpy as np

from .blend import greedy_assignment


def check_curriculum(knots, n_datasets: int | None) -> None:
    """One-line ValueError naming data.curriculum when the knots are not a valid schedule."""
    if not isinstance(knots, list) or not knots:
        raise ValueError(f"data.curriculum: expected a non-empty list of [step, w_1, ..., w_k] rows, got {knots!r}")
    width = None
    last = None
    for i, row in enumerate(knots):
        if not isinstance(row, list) or len(row) < 2 or not all(isinstance(x, (int, float)) for x in row):
            raise ValueError(f"data.curriculum: row {i} must be [step, w_1, ..., w_k] numbers, got {row!r}")
        width = width or len(row) - 1
        if len(row) - 1 != width:
            raise ValueError(f"data.curriculum: row {i} has {len(row) - 1} weights, row 0 has {width}")
        if last is not None and row[0] <= last:
            raise ValueError(f"data.curriculum: steps must increase, but row {i} is at step {row[0]} after {last}")
        last = row[0]
        w = row[1:]
        if any(x < 0 for x in w) or not sum(w) > 0 or not np.isfinite(w).all():
            raise ValueError(f"data.curriculum: row {i} (step {row[0]}) weights {w} must be non-negative "
                             f"with a positive sum")
    if n_datasets is not None and width != n_datasets:
        raise ValueError(f"data.curriculum: {width} weights per row but data.blend has {n_datasets} datasets")


def weights_at(knots, steps: np.ndarray) -> np.ndarray:
    """[len(steps), k]: the normalized weights of each step, piecewise linear in the step."""
    xs = np.asarray([row[0] for row in knots], dtype=np.float64)
    ws = np.asarray([row[1:] for row in knots], dtype=np.float64)
    ws = ws / ws.sum(axis=1, keepdims=True)
    out = np.stack([np.interp(steps, xs, ws[:, d]) for d in range(ws.shape[1])], axis=1)
    return out / out.sum(axis=1, keepdims=True)


def curriculum_assignment(knots, global_batch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) for `size` samples, as blend.blend_assignment returns."""
    w = weights_at(knots, np.arange(size) // global_batch)         # [size, k]
    target = np.cumsum(w, axis=0).tolist()                         # target share after sample i
    return greedy_assignment(target.__getitem__, size, w.shape[1])


def check_seq_len_warmup(warmup, seq_len: int) -> None:
    if not (isinstance(warmup, list) and len(warmup) == 2 and all(isinstance(x, int) for x in warmup)):
        raise ValueError(f"data.seq_len_warmup: expected [start_length, steps] integers, got {warmup!r}")
    start, steps = warmup
    if not 1 <= start <= seq_len or steps < 1:
        raise ValueError(f"data.seq_len_warmup: start {start} must lie in [1, train.seq_len={seq_len}] and "
                         f"steps {steps} be >= 1")


def seq_len_at(step: int, seq_len: int, warmup, multiple: int = 1) -> int:
    """The sequence length of `step` under data.seq_len_warmup (None: seq_len)."""
    if not warmup:
        return seq_len
    start, steps = warmup
    if step >= steps:
        return seq_len
    length = start + (seq_len - start) * step // steps
    return min(seq_len, max(start, length // multiple * multiple, multiple))
