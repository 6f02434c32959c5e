"""GPT pretraining samples: fixed-length windows over the concatenated documents.

Megatron's construction, in numpy:

  doc_idx      the documents of the range, one shuffled permutation per epoch, as many epochs
               as it takes to cover num_samples; this order defines one long token stream
  sample_idx   [n + 1, 2] (position in doc_idx, offset in that document) where sample i starts;
               sample i is stream[i * seq_len : (i + 1) * seq_len + 1], so consecutive samples
               share one token (the last label of one is the first input of the next) and a
               sample may cross any number of document boundaries
  shuffle_idx  the order samples are served in: the samples of all but the last epoch are
               shuffled together, those of the last epoch separately, so the first num_samples
               see every document of the full epochs once and a random part of the last one

The three arrays are built once and cached as .npy files (read back with allow_pickle=False),
keyed by everything they depend on: the .idx file's content hash, the document range, seq_len,
num_samples and seed. Numpy's legacy RandomState is used because its stream is frozen across
numpy versions, so a rebuilt index matches the cached one.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np

from megagpt.data.indexed import DataError, IndexedDataset, check_tokenizer

_INDEX_VERSION = 1    # bump when the construction below changes, to invalidate old caches
_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")


def build_sample_index(sizes: np.ndarray, doc_range: tuple[int, int], seq_len: int,
                       num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) for documents [start, end) of lengths `sizes`."""
    start, end = doc_range
    doc_sizes = np.asarray(sizes[start:end], dtype=np.int64)
    tokens_per_epoch = int(doc_sizes.sum())
    if tokens_per_epoch == 0:
        raise DataError(f"documents [{start}, {end}) hold no tokens")
    # A sample needs seq_len + 1 tokens and shares one with the next: n samples need
    # n * seq_len + 1 tokens in the stream.
    num_epochs = -(-(num_samples * seq_len + 1) // tokens_per_epoch)
    rng = np.random.RandomState(seed)
    doc_dtype = np.int32 if end < 2**31 else np.int64
    doc_idx = np.concatenate([rng.permutation(np.arange(start, end, dtype=doc_dtype))
                              for _ in range(num_epochs)])

    # Sample starts as positions in the stream, then as (doc_idx position, offset) by
    # searching the running token count.
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    positions = np.arange(total_samples + 1, dtype=np.int64) * seq_len
    stream_sizes = np.asarray(sizes, dtype=np.int64)[doc_idx]
    doc_starts = np.concatenate([[0], np.cumsum(stream_sizes)])
    which = np.searchsorted(doc_starts, positions, side="right") - 1
    sample_idx = np.stack([which, positions - doc_starts[which]], axis=1).astype(np.int64)

    first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len if num_epochs > 1 else 0
    shuffle_idx = np.concatenate([rng.permutation(first),
                                  first + rng.permutation(total_samples - first)])
    return doc_idx, sample_idx, shuffle_idx[:num_samples].astype(np.int64)


class GPTDataset:
    """num_samples samples of seq_len + 1 tokens (np.int64) from documents [start, end)."""

    def __init__(self, indexed: IndexedDataset | str, doc_range: tuple[int, int], seq_len: int,
                 num_samples: int, seed: int, cache_dir: str | None = None):
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        start, end = (int(x) for x in doc_range)
        if not 0 <= start < end <= len(self.indexed):
            raise DataError(f"{self.indexed.idx_path}: document range [{start}, {end}) is empty "
                            f"or outside the {len(self.indexed)} documents")
        if seq_len < 1 or num_samples < 1:
            raise DataError(f"{self.indexed.idx_path}: seq_len ({seq_len}) and num_samples "
                            f"({num_samples}) must be >= 1")
        self.doc_range, self.seq_len = (start, end), seq_len
        self.num_samples, self.seed = num_samples, seed

        key = {"version": _INDEX_VERSION, "idx": self.indexed.idx_fingerprint,
               "doc_range": [start, end], "seq_len": seq_len, "num_samples": num_samples,
               "seed": seed}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache_dir = cache_dir or os.path.dirname(os.path.abspath(self.indexed.prefix))
        stem = os.path.join(cache_dir, f"{os.path.basename(self.indexed.prefix)}_{digest}")
        self.cache_paths = {name: f"{stem}_{name}.npy" for name in _NAMES}
        self._desc_path = f"{stem}_desc.json"   # written last: its presence marks a whole cache

        arrays = self._load_cache()
        self.loaded_from_cache = arrays is not None
        if arrays is None:
            arrays = build_sample_index(self.indexed.sizes, (start, end), seq_len, num_samples, seed)
            self._save_cache(arrays, key)
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays

    def _load_cache(self):
        if not os.path.exists(self._desc_path):
            return None
        try:
            arrays = tuple(np.load(self.cache_paths[n], allow_pickle=False, mmap_mode="r")
                           for n in _NAMES)
        except (OSError, ValueError) as e:
            warnings.warn(f"{self._desc_path}: unreadable sample index cache ({e}); rebuilding")
            return None
        doc_idx, sample_idx, shuffle_idx = arrays
        if (shuffle_idx.shape != (self.num_samples,) or sample_idx.ndim != 2
                or sample_idx.shape[1] != 2 or doc_idx.ndim != 1
                or shuffle_idx.max() >= len(sample_idx) - 1):
            warnings.warn(f"{self._desc_path}: sample index cache has the wrong shape; rebuilding")
            return None
        return arrays

    def _save_cache(self, arrays, key: dict) -> None:
        # Temp file + rename: ranks building the same index at once each write whole files,
        # and a crash leaves no half-written cache behind.
        tmp_suffix = f".tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self._desc_path), exist_ok=True)
            for name, array in zip(_NAMES, arrays):
                with open(self.cache_paths[name] + tmp_suffix, "wb") as f:
                    np.save(f, array, allow_pickle=False)
                os.replace(self.cache_paths[name] + tmp_suffix, self.cache_paths[name])
            with open(self._desc_path + tmp_suffix, "w") as f:
                epochs = len(arrays[0]) // (self.doc_range[1] - self.doc_range[0])
                json.dump({**key, "prefix": self.indexed.prefix, "num_epochs": epochs}, f, indent=2)
            os.replace(self._desc_path + tmp_suffix, self._desc_path)
        except OSError as e:
            warnings.warn(f"cannot cache the sample index in {os.path.dirname(self._desc_path)} "
                          f"({e.strerror}); it will be rebuilt next time (set cache_dir)")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        j = int(self.shuffle_idx[i])
        (d0, o0), (d1, o1) = self.sample_idx[j], self.sample_idx[j + 1]
        get = self.indexed.get
        if d0 == d1:
            parts = [get(int(self.doc_idx[d0]), offset=int(o0), length=int(o1 - o0 + 1))]
        else:
            parts = [get(int(self.doc_idx[d0]), offset=int(o0))]
            parts += [get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
            parts.append(get(int(self.doc_idx[d1]), length=int(o1 + 1)))
        sample = np.concatenate(parts).astype(np.int64)
        assert len(sample) == self.seq_len + 1, "sample index and documents disagree"
        return sample


def split_documents(num_docs: int, split) -> list[tuple[int, int]]:
    """Contiguous document ranges for the train/valid/test weights (e.g. [98, 1, 1] or "98,1,1").

    Each split with a positive weight gets at least one document when there are enough
    documents, taken from the largest split.
    """
    weights = [float(w) for w in (split.split(",") if isinstance(split, str) else split)]
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise DataError(f"split {split!r} must be three non-negative weights, e.g. 98,1,1")
    bounds = np.round(np.cumsum([0.0] + weights) / sum(weights) * num_docs).astype(int)
    sizes = list(np.diff(bounds))
    for i, w in enumerate(weights):
        if w > 0 and sizes[i] == 0:
            donor = int(np.argmax(sizes))
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[i] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(starts[i]), int(starts[i + 1])) for i in range(3)]


def build_train_valid_test(prefix: str, *, seq_len: int, num_samples, split=(98, 1, 1),
                           seed: int = 1234, cache_dir: str | None = None,
                           vocab_size: int | None = None, tokenizer_fingerprint: str | None = None):
    """(train, valid, test) GPTDatasets over one indexed dataset, split by documents.

    num_samples is (n_train, n_valid, n_test); a split with 0 samples is None. Passing a
    tokenizer's vocab_size / fingerprint checks the data was made with that tokenizer (whether a
    model's vocab can hold the data is indexed.fit_model_vocab's rule).
    """
    indexed = IndexedDataset(prefix)
    check_tokenizer(indexed, vocab_size, tokenizer_fingerprint)
    ranges = split_documents(len(indexed), split)
    out = []
    for name, (start, end), n, offset in zip(("train", "valid", "test"), ranges, num_samples,
                                             range(3)):
        if n <= 0:
            out.append(None)
            continue
        if start == end:
            raise DataError(f"{indexed.idx_path}: the {name} split has no documents "
                            f"({len(indexed)} documents, split {split}) but {n} samples "
                            "were asked for")
        # A different seed per split keeps their shuffles independent.
        out.append(GPTDataset(indexed, (start, end), seq_len, n, seed + offset, cache_dir))
    return tuple(out)
