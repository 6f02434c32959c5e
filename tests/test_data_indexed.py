"""Indexed dataset: round trip, header fields, and a DataError naming the file for each
corrupt-input case."""
import os
import pickle
import struct

import numpy as np
import pytest

from megagpt.data.indexed import (HEADER_SIZE, DataError, IndexedDataset, IndexedDatasetBuilder,
                                  best_dtype, check_tokenizer)

FP = "0123456789abcdef"


def _build(prefix, docs, vocab=1000, dtype=np.uint16, eod=0, fp=FP):
    with IndexedDatasetBuilder(prefix, dtype, vocab, fp, eod) as b:
        for d in docs:
            b.add_doc(d)
        b.finalize()
    return str(prefix)


@pytest.fixture
def docs():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 1000, size=rng.integers(1, 40)) for _ in range(25)]


def test_round_trip_and_header(tmp_path, docs):
    prefix = _build(tmp_path / "d", docs, eod=7)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs)
    assert ds.vocab_size == 1000 and ds.eod_id == 7 and ds.tokenizer_fingerprint == FP
    assert ds.num_tokens == sum(len(d) for d in docs)
    assert ds.dtype == np.uint16
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds.get(i), d)
    np.testing.assert_array_equal(ds.get(3, offset=1, length=2), docs[3][1:3])
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in docs])
    # Atomic write: only the final files are left behind.
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]
    assert os.path.getsize(prefix + ".bin") == ds.num_tokens * 2


def test_int32_for_large_vocab(tmp_path):
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32
    prefix = _build(tmp_path / "big", [[70000, 1, 2]], vocab=100000, dtype=best_dtype(100000))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.int32 and list(ds.get(0)) == [70000, 1, 2]


def test_builder_rejects_out_of_range_ids_and_cleans_up(tmp_path):
    with pytest.raises(DataError, match="out of range"):
        with IndexedDatasetBuilder(tmp_path / "x", np.uint16, 100, FP, 0) as b:
            b.add_doc([1, 2, 100])
    assert os.listdir(tmp_path) == []


def test_missing_files(tmp_path, docs):
    with pytest.raises(DataError, match=r"nope\.idx: file not found"):
        IndexedDataset(tmp_path / "nope")
    prefix = _build(tmp_path / "d", docs)
    os.remove(prefix + ".bin")
    with pytest.raises(DataError, match=r"d\.bin: file not found"):
        IndexedDataset(prefix)


def test_empty_files(tmp_path, docs):
    prefix = _build(tmp_path / "d", docs)
    open(prefix + ".bin", "wb").close()
    with pytest.raises(DataError, match=r"d\.bin: file is empty"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").close()
    with pytest.raises(DataError, match=r"d\.idx: file is empty"):
        IndexedDataset(prefix)


def test_truncated_bin(tmp_path, docs):
    prefix = _build(tmp_path / "d", docs)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(DataError, match=r"d\.bin: .*truncated"):
        IndexedDataset(prefix)


def test_bad_magic_and_short_header(tmp_path, docs):
    prefix = _build(tmp_path / "d", docs)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"GARBAGE!")
    with pytest.raises(DataError, match=r"d\.idx: bad magic"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MGPTIDX\0" + b"\0" * 10)
    with pytest.raises(DataError, match=r"d\.idx: corrupt header"):
        IndexedDataset(prefix)


def test_truncated_idx_and_non_monotonic_offsets(tmp_path, docs):
    prefix = _build(tmp_path / "d", docs)
    idx = prefix + ".idx"
    with open(idx, "r+b") as f:
        f.truncate(os.path.getsize(idx) - 8)
    with pytest.raises(DataError, match=r"d\.idx: .*truncated"):
        IndexedDataset(prefix)

    prefix = _build(tmp_path / "e", docs)
    with open(prefix + ".idx", "r+b") as f:          # offsets[2] = 0 < offsets[1]
        f.seek(HEADER_SIZE + 2 * 8)
        f.write(struct.pack("<q", 0))
    with pytest.raises(DataError, match=r"e\.idx: .*not monotonic"):
        IndexedDataset(prefix)


def test_check_tokenizer(tmp_path, docs):
    ds = IndexedDataset(_build(tmp_path / "d", docs, vocab=1000))
    check_tokenizer(ds, vocab_size=1000, fingerprint=FP)          # matches: no error
    with pytest.raises(DataError, match=r"d\.idx was made with a tokenizer of vocab 1000 "
                                        r"\(fingerprint 0123456789abcdef\), but .* expects vocab 5000"):
        check_tokenizer(ds, vocab_size=5000)
    with pytest.raises(DataError, match="expects fingerprint ffffffffffffffff"):
        check_tokenizer(ds, fingerprint="ffffffffffffffff")


def test_pickles_by_path(tmp_path, docs):
    # What a DataLoader worker process receives: the prefix, not a copy of the tokens.
    ds = IndexedDataset(_build(tmp_path / "d", docs))
    blob = pickle.dumps(ds)
    assert len(blob) < 200
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again.get(4), docs[4])
