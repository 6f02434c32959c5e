"""GPTDataset index construction and cache, train/valid/test split, blending, sampler."""
import os

import numpy as np
import pytest
import torch

import megagpt.data.gpt_dataset as gpt_dataset
from megagpt.data.blend import BlendedDataset
from megagpt.data.gpt_dataset import GPTDataset, build_train_valid_test, split_documents
from megagpt.data.indexed import DataError, IndexedDataset, IndexedDatasetBuilder
from megagpt.data.sampler import MicroBatchSampler, make_batch

VOCAB, EOD = 5000, 0


@pytest.fixture
def prefix(tmp_path):
    """20 documents of 1..30 tokens; every token is distinct so a misplaced slice shows."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 31, size=20)
    with IndexedDatasetBuilder(tmp_path / "d", np.uint16, VOCAB, "f" * 16, EOD) as b:
        start = 1
        for n in lengths:
            b.add_doc(np.r_[np.arange(start, start + n - 1), EOD])
            start += n
        b.finalize()
    return str(tmp_path / "d")


def stream_of(ds):
    return np.concatenate([ds.indexed.get(int(d)) for d in ds.doc_idx]).astype(np.int64)


@pytest.mark.parametrize("doc_range,seq_len,num_samples", [((0, 20), 7, 100), ((5, 15), 16, 9),
                                                           ((3, 4), 3, 50)])
def test_samples_reproduce_the_stream(prefix, tmp_path, doc_range, seq_len, num_samples):
    ds = GPTDataset(prefix, doc_range, seq_len, num_samples, seed=3, cache_dir=str(tmp_path / "c"))
    start, end = doc_range
    n_docs = end - start
    # doc_idx: whole epochs, each a permutation of the range.
    assert len(ds.doc_idx) % n_docs == 0
    for epoch in np.split(np.asarray(ds.doc_idx), len(ds.doc_idx) // n_docs):
        assert sorted(epoch) == list(range(start, end))
    stream = stream_of(ds)
    assert len(ds) == num_samples and sorted(set(ds.shuffle_idx)) == sorted(ds.shuffle_idx)
    samples = {}
    for i in range(len(ds)):
        s = ds[i]
        assert s.dtype == np.int64 and s.shape == (seq_len + 1,)
        samples[int(ds.shuffle_idx[i])] = s
    # De-shuffled, consecutive samples overlap by one token and tile the stream exactly.
    order = sorted(samples)
    for j in order:
        np.testing.assert_array_equal(samples[j], stream[j * seq_len:(j + 1) * seq_len + 1])
    run = [j for k, j in enumerate(order) if j == k]            # the contiguous prefix 0..m-1
    assert run, "sample 0 of the stream is always served (it is in the first epoch)"
    tiled = np.concatenate([samples[j][:-1] for j in run] + [samples[run[-1]][-1:]])
    np.testing.assert_array_equal(tiled, stream[:len(tiled)])
    # The full epochs come first in the order (only the last epoch is subsampled).
    epochs = len(ds.doc_idx) // n_docs
    full = ((epochs - 1) * int(ds.indexed.sizes[start:end].sum()) - 1) // seq_len if epochs > 1 else 0
    assert len(run) >= min(full, num_samples)


def test_samples_cross_document_boundaries(prefix, tmp_path):
    ds = GPTDataset(prefix, (0, 20), 32, 20, seed=1, cache_dir=str(tmp_path))
    assert any(EOD in ds[i][:-1] for i in range(len(ds)))


def test_index_is_cached_and_reused(prefix, tmp_path, monkeypatch):
    a = GPTDataset(prefix, (0, 20), 8, 60, seed=5)              # default cache: next to the data
    assert not a.loaded_from_cache
    paths = list(a.cache_paths.values())
    assert all(os.path.dirname(p) == os.path.dirname(prefix) for p in paths)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]

    def no_rebuild(*args, **kwargs):
        raise AssertionError("index rebuilt although cached")
    monkeypatch.setattr(gpt_dataset, "build_sample_index", no_rebuild)
    b = GPTDataset(prefix, (0, 20), 8, 60, seed=5)
    assert b.loaded_from_cache and [os.stat(p).st_mtime_ns for p in paths] == mtimes
    assert all(np.array_equal(a[i], b[i]) for i in range(60))
    with pytest.raises(AssertionError, match="rebuilt"):        # another seed is another index
        GPTDataset(prefix, (0, 20), 8, 60, seed=6)


def test_seed_changes_order(prefix, tmp_path):
    a = GPTDataset(prefix, (0, 20), 8, 40, seed=1, cache_dir=str(tmp_path))
    b = GPTDataset(prefix, (0, 20), 8, 40, seed=2, cache_dir=str(tmp_path))
    assert not all(np.array_equal(a[i], b[i]) for i in range(40))


def test_split_documents():
    assert split_documents(100, [98, 1, 1]) == [(0, 98), (98, 99), (99, 100)]
    assert split_documents(10, "98,1,1") == [(0, 8), (8, 9), (9, 10)]   # each split gets a doc
    assert split_documents(3, [98, 1, 1]) == [(0, 1), (1, 2), (2, 3)]
    assert split_documents(10, [1, 0, 0]) == [(0, 10), (10, 10), (10, 10)]
    with pytest.raises(DataError, match="three non-negative weights"):
        split_documents(10, [1, 1])


def test_build_train_valid_test(prefix, tmp_path):
    train, valid, test = build_train_valid_test(prefix, split=[80, 10, 10], seq_len=8,
                                                num_samples=(50, 5, 0), seed=7,
                                                cache_dir=str(tmp_path))
    assert test is None and len(train) == 50 and len(valid) == 5
    assert train.doc_range == (0, 16) and valid.doc_range == (16, 18)
    assert set(np.asarray(valid.doc_idx)) <= set(range(16, 18))
    with pytest.raises(DataError, match=r"d\.idx: the test split has no documents"):
        build_train_valid_test(prefix, split=[1, 1, 0], seq_len=8, num_samples=(5, 5, 5), seed=7)
    with pytest.raises(DataError, match="was made with a tokenizer of vocab 5000"):
        build_train_valid_test(prefix, seq_len=8, num_samples=(5, 5, 5), vocab_size=32000)


def test_blend_holds_weights_over_every_window():
    rng = np.random.default_rng(0)
    cases = [[5, 3, 2], [0.7, 0.3], [1, 1, 1, 1]] + [list(rng.random(3) ** 2) for _ in range(5)]
    for weights in cases:
        size = 1000
        parts = [[(d, j) for j in range(size)] for d in range(len(weights))]
        blend = BlendedDataset(parts, weights, size)
        w = np.asarray(weights) / np.sum(weights)
        picks = np.array([blend[i][0] for i in range(size)])
        for d in range(len(weights)):
            # err[t] = count in the first t samples - w * t; a window [a, b) is off by
            # err[b] - err[a], so max(err) - min(err) bounds every window at once.
            count = np.concatenate([[0], np.cumsum(picks == d)])
            err = count - w[d] * np.arange(size + 1)
            assert np.abs(err).max() <= 1.0 + 1e-9, (weights, d)
            assert err.max() - err.min() <= 2.0, (weights, d)
            # Each dataset's samples are taken in order, none skipped or repeated.
            assert [blend[i][1] for i in np.flatnonzero(picks == d)] == list(range(count[-1]))


def test_blend_errors():
    with pytest.raises(DataError, match="dataset 1 has 10 samples"):
        BlendedDataset([list(range(100)), list(range(10))], [1, 1], 100)
    with pytest.raises(DataError, match="non-negative"):
        BlendedDataset([[0], [0]], [1, -1], 1)


def test_sampler_disjoint_and_resumable():
    total, mbs, dp = 103, 3, 4
    per_rank = [list(MicroBatchSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    assert all(len(b) == total // (mbs * dp) == len(MicroBatchSampler(total, 0, mbs, r, dp))
               for r, b in enumerate(per_rank))
    for step, batches in enumerate(zip(*per_rank)):
        flat = [i for b in batches for i in b]
        # Each step takes the next mbs * dp consecutive indices; ranks get disjoint slices.
        assert flat == list(range(step * mbs * dp, (step + 1) * mbs * dp))
    # Resume: a sampler built from the consumed count continues where the first one stopped.
    for r in range(dp):
        consumed = 5 * mbs * dp
        assert list(MicroBatchSampler(total, consumed, mbs, r, dp)) == per_rank[r][5:]
    # drop_last=False hands out the partial last step.
    tail = [list(MicroBatchSampler(total, 96, mbs, r, dp, drop_last=False)) for r in range(dp)]
    assert tail == [[[96, 97, 98]], [[99, 100, 101]], [[102]], []]
    with pytest.raises(ValueError, match="dp_rank 4"):
        MicroBatchSampler(total, 0, mbs, 4, dp)


def test_make_batch(prefix, tmp_path):
    ds = GPTDataset(prefix, (0, 20), 8, 10, seed=1, cache_dir=str(tmp_path))
    tokens, labels = make_batch(ds, [0, 3, 4])
    assert tokens.shape == labels.shape == (3, 8) and tokens.dtype == labels.dtype == torch.int64
    np.testing.assert_array_equal(tokens[1].numpy(), ds[3][:-1])
    np.testing.assert_array_equal(labels[1].numpy(), ds[3][1:])


def test_bad_ranges(prefix):
    with pytest.raises(DataError, match="document range"):
        GPTDataset(IndexedDataset(prefix), (5, 5), 8, 10, seed=1)
