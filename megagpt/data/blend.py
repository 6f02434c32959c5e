"""Blend several datasets with given weights into one.

The sample-to-dataset assignment is greedy error-minimizing (as in Megatron's helpers): at
step i take the dataset whose share is furthest behind, i.e. the largest
weight * (i + 1) - count_so_far. Every prefix of the blend then holds each dataset's weight to
within about one sample, so any window holds it to within two: a short eval or the first steps after
a resume see the mixture that was asked for, not just its long-run average. (A dataset is
never more than one sample ahead of its share; it can fall slightly more than one behind only
with many datasets of very uneven weights.) Ties go to the lower dataset index, so the
assignment is deterministic.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from megagpt.data.indexed import DataError


def greedy_assignment(target_row, size: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy rule itself (module docstring): sample i goes to the dataset furthest behind its
    target count target_row(i)[d], ties to the lower index -> (dataset_index, dataset_sample_index).
    Fixed weights (here) and a curriculum (curriculum.py) differ only in their targets."""
    counts = [0] * k
    dataset_index = np.empty(size, dtype=np.int16 if k < 2**15 else np.int32)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    # Plain Python over a few datasets beats numpy's per-call overhead at every step.
    for i in range(size):
        row = target_row(i)
        best, best_err = 0, row[0] - counts[0]
        for d in range(1, k):
            err = row[d] - counts[d]
            if err > best_err:
                best, best_err = d, err
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, dataset_sample_index


def blend_assignment(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index): blend sample i is sample
    dataset_sample_index[i] of dataset dataset_index[i]. Weights must already be normalized."""
    return greedy_assignment(lambda i: [w * (i + 1) for w in weights], size, len(weights))


def blend_parts(blend: list | None, path: str | None) -> tuple[list[float], list[str]]:
    """A run's data as (weights, prefixes): data.blend [weight, prefix, weight, prefix, ...], else the
    one prefix data.path at weight 1, else ([], []): synthetic tokens."""
    if not blend:
        return ([1.0], [str(path)]) if path is not None else ([], [])
    try:
        if len(blend) % 2:
            raise ValueError
        return [float(w) for w in blend[0::2]], [str(x) for x in blend[1::2]]
    except (TypeError, ValueError):
        raise DataError(f"data.blend: expected [weight, prefix, weight, prefix, ...], got {blend!r}") from None


class BlendedDataset:
    """`size` samples drawn from `datasets` in proportion to `weights` (normalized here)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, assignment=None):
        """assignment: (dataset_index, dataset_sample_index) to use instead of the weights' (a curriculum)."""
        if len(datasets) == 0 or len(datasets) != len(weights):
            raise DataError(f"blend: {len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
            raise DataError(f"blend: weights {list(weights)} must be non-negative with a "
                            "positive sum")
        if size < 0:
            raise DataError(f"blend: size {size} must be >= 0")
        self.datasets = list(datasets)
        self.weights = (w / w.sum()).tolist()
        self.size = size
        self.dataset_index, self.dataset_sample_index = \
            assignment if assignment is not None else blend_assignment(self.weights, size)
        needed = np.bincount(self.dataset_index, minlength=len(datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, needed)):
            if len(ds) < n:
                raise DataError(f"blend: dataset {d} has {len(ds)} samples but its weight "
                                f"{self.weights[d]:.4f} of {size} needs {int(n)}; build it "
                                "with more samples")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for {self.size} samples")
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]
