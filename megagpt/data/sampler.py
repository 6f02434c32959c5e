"""Micro-batch index sampler for data parallelism, resumable from a sample count.

Each step of the data-parallel group takes the next micro_batch_size * dp_size consecutive
sample indices; rank r gets the r-th slice of micro_batch_size. Ranks therefore never share a
sample, and the whole state of the sampler is `consumed_samples` (what a checkpoint stores):
restarting with the stored count continues exactly where the run stopped, on any rank.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch


class MicroBatchSampler:
    """Yields lists of `micro_batch_size` sample indices for data-parallel rank `dp_rank`."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, drop_last: bool = True):
        if total_samples <= 0:
            raise ValueError(f"total_samples must be > 0, got {total_samples}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} must be in "
                             f"[0, total_samples={total_samples}]")
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) "
                             "must be > 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.drop_last = drop_last

    @property
    def step_size(self) -> int:
        """Samples the whole data-parallel group consumes per micro-batch step."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        full, rest = divmod(remaining, self.step_size)
        return full + (1 if rest > self.dp_rank * self.micro_batch_size and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, self.step_size):
            end = min(start + self.step_size, self.total_samples)
            if end - start < self.step_size:
                # A last, partial step: every rank must run the same number of steps, so
                # it is dropped by default; otherwise each rank takes what is left of its slice.
                if self.drop_last or start + lo >= end:
                    return
            yield list(range(start + lo, min(start + lo + self.micro_batch_size, end)))


def make_batch(dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels), each [batch, seq_len] int64: labels are tokens shifted left by one."""
    samples = np.stack([np.asarray(dataset[int(i)], dtype=np.int64) for i in indices])
    data = torch.from_numpy(samples)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()
