"""Synthetic tokens for runs without a dataset: learnable, deterministic, and free to generate.

Sample i is an arithmetic progression modulo the vocab, with a start and a stride drawn from a
generator seeded by (seed, i): a model can learn to continue it, so the loss falls and a broken
layout shows up as a different curve, and any rank can produce any sample without I/O.
"""
from __future__ import annotations

import numpy as np


class SyntheticDataset:
    def __init__(self, vocab_size: int, seq_len: int, num_samples: int, seed: int, max_stride: int = 7):
        self.vocab_size, self.seq_len, self.num_samples = vocab_size, seq_len, num_samples
        self.seed, self.max_stride = seed, max_stride

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"synthetic sample {i} outside [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, i])
        start = int(rng.integers(0, self.vocab_size))
        stride = int(rng.integers(1, self.max_stride + 1))
        return (start + stride * np.arange(self.seq_len + 1, dtype=np.int64)) % self.vocab_size
