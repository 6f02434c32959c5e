"""Memory-mapped indexed dataset: token ids in PREFIX.bin, document offsets in PREFIX.idx.

Layout of PREFIX.idx (little-endian):

    magic      8 bytes   b"MGPTIDX\\0"
    version    uint32    1
    dtype      uint8     code of the token dtype in .bin (see DTYPE_CODES), then 3 pad bytes
    vocab      int64     vocab size of the tokenizer that made the tokens
    tokenizer  16 bytes  ascii hex fingerprint of that tokenizer (see Tokenizer.fingerprint)
    eod_id     int64     id of the end-of-document token appended after each document
    num_docs   int64
    offsets    int64 * (num_docs + 1)   token offsets into .bin; doc i is bin[off[i]:off[i+1]]

PREFIX.bin is the raw token array; its size must be offsets[-1] * itemsize. Both files are
validated when opened, so a truncated copy or a half-written file fails loudly (DataError,
naming the file) instead of training on garbage. The header carries the tokenizer's vocab size
and fingerprint so a run can refuse data made with another tokenizer (check_tokenizer), and
so the model's vocab can follow the data (fit_model_vocab).
"""
from __future__ import annotations

import hashlib
import os
import struct
from array import array

import numpy as np


class DataError(ValueError):
    """A data file or data setting is wrong. The message is one line and names the file."""


MAGIC = b"MGPTIDX\0"
VERSION = 1
# Same codes as Megatron's indexed datasets, so the numbers mean the same thing to its users.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_HEADER = struct.Struct("<8sIB3xq16sqq")   # magic, version, dtype, vocab, fingerprint, eod, num_docs
HEADER_SIZE = _HEADER.size                 # 56: a multiple of 8, so the offsets are aligned


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, t in DTYPE_CODES.items():
        if np.dtype(t) == dtype:
            return code
    raise DataError(f"token dtype {dtype} is not supported (use one of "
                    f"{', '.join(np.dtype(t).name for t in DTYPE_CODES.values())})")


def best_dtype(vocab_size: int) -> type:
    """uint16 halves the file size; it holds ids below 65536, with a margin for added tokens."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDataset:
    """Read-only view of PREFIX.bin / PREFIX.idx. len() is the number of documents."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: file not found")
        idx_size = os.path.getsize(self.idx_path)
        if idx_size == 0:
            raise DataError(f"{self.idx_path}: file is empty")
        if idx_size < HEADER_SIZE:
            raise DataError(f"{self.idx_path}: corrupt header ({idx_size} bytes, "
                            f"a header has {HEADER_SIZE})")
        with open(self.idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic, version, code, vocab, fp, eod, num_docs = _HEADER.unpack(header)
        if magic != MAGIC:
            raise DataError(f"{self.idx_path}: bad magic bytes {magic!r}, "
                            "not a megagpt indexed dataset")
        if version != VERSION:
            raise DataError(f"{self.idx_path}: format version {version} is not supported "
                            f"(this code reads version {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: corrupt header (unknown dtype code {code})")
        if num_docs < 0 or vocab <= 0:
            raise DataError(f"{self.idx_path}: corrupt header "
                            f"(num_docs={num_docs}, vocab_size={vocab})")
        expected = HEADER_SIZE + 8 * (num_docs + 1)
        if idx_size != expected:
            raise DataError(f"{self.idx_path}: has {idx_size} bytes but its header says "
                            f"{num_docs} documents ({expected} bytes); truncated or corrupt")

        self.dtype = np.dtype(DTYPE_CODES[code])
        self.vocab_size = int(vocab)
        self.tokenizer_fingerprint = fp.rstrip(b"\0").decode("ascii", errors="replace")
        self.eod_id = int(eod)
        self.offsets = np.memmap(self.idx_path, dtype=np.int64, mode="r",
                                 offset=HEADER_SIZE, shape=(num_docs + 1,))
        if self.offsets[0] != 0 or np.any(self.offsets[1:] < self.offsets[:-1]):
            raise DataError(f"{self.idx_path}: document offsets are not monotonic; corrupt index")
        self.num_tokens = int(self.offsets[-1])

        bin_size = os.path.getsize(self.bin_path)
        if bin_size == 0:
            raise DataError(f"{self.bin_path}: file is empty")
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise DataError(f"{self.bin_path}: has {bin_size} bytes but {self.idx_path} says "
                            f"{self.num_tokens} tokens of {self.dtype.name} "
                            f"({self.num_tokens * self.dtype.itemsize} bytes); truncated or corrupt")
        self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        self._idx_fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    # Pickle the path, not the mapped arrays: a DataLoader worker reopens the files instead of
    # receiving a copy of the whole token array.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per document (int64), eod included."""
        return np.diff(self.offsets)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of document i, or `length` of them starting at `offset` (a view, not a copy)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        i = i % len(self)
        start, end = int(self.offsets[i]) + offset, int(self.offsets[i + 1])
        if length is not None:
            end = min(end, start + length)
        return np.asarray(self._tokens[start:end])

    __getitem__ = get

    @property
    def idx_fingerprint(self) -> str:
        """sha256 (16 hex chars) of the whole .idx file: names caches built from this data."""
        if self._idx_fingerprint is None:
            h = hashlib.sha256()
            with open(self.idx_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._idx_fingerprint = h.hexdigest()[:16]
        return self._idx_fingerprint


def check_tokenizer(ds: IndexedDataset, vocab_size: int | None = None,
                    fingerprint: str | None = None) -> None:
    """Raise DataError if the data was made with another tokenizer than the one expected."""
    bad_vocab = vocab_size is not None and vocab_size != ds.vocab_size
    bad_fp = fingerprint is not None and fingerprint != ds.tokenizer_fingerprint
    if bad_vocab or bad_fp:
        want = []
        if vocab_size is not None:
            want.append(f"vocab {vocab_size}")
        if fingerprint is not None:
            want.append(f"fingerprint {fingerprint}")
        raise DataError(f"{ds.idx_path} was made with a tokenizer of vocab {ds.vocab_size} "
                        f"(fingerprint {ds.tokenizer_fingerprint}), but the model/tokenizer "
                        f"expects {', '.join(want)}")


def fit_model_vocab(prefixes, vocab_size: int | None) -> int:
    """The model's vocab for training on these datasets, as Megatron does: it comes from the tokenizer
    (the model then pads it, ModelConfig.padded_vocab). vocab_size None (unset) follows the largest
    tokenizer vocab of the data; a larger one is valid (its extra rows are never a label); a smaller
    one cannot embed every token id and raises a DataError naming model.vocab_size and the .idx file."""
    datasets = [IndexedDataset(p) for p in prefixes]
    if not datasets:
        raise DataError("no dataset prefixes given")
    if vocab_size is None:
        return max(ds.vocab_size for ds in datasets)
    for ds in datasets:
        if vocab_size < ds.vocab_size:
            raise DataError(f"model.vocab_size: {vocab_size} is smaller than the vocab {ds.vocab_size} of the "
                            f"tokenizer that made {ds.idx_path}; set it >= {ds.vocab_size} or leave it unset "
                            "to follow the data")
    return vocab_size


class IndexedDatasetBuilder:
    """Streams documents to PREFIX.bin.tmp and writes PREFIX.idx at finalize().

    Both files are renamed into place only at the end, so readers never see half a dataset.
    Offsets live in an int64 array (8 bytes per document), tokens go straight to disk.
    Use as a context manager to remove the temp files if anything fails before finalize().
    """

    def __init__(self, prefix: str | os.PathLike, dtype, vocab_size: int, fingerprint: str,
                 eod_id: int):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if vocab_size - 1 > np.iinfo(self.dtype).max:
            raise DataError(f"{self.prefix}: vocab {vocab_size} does not fit in {self.dtype.name}")
        fp = fingerprint.encode("ascii")
        if len(fp) > 16:
            raise DataError(f"{self.prefix}: tokenizer fingerprint {fingerprint!r} is longer "
                            "than 16 characters")
        self.vocab_size, self.fingerprint, self.eod_id = vocab_size, fp.ljust(16, b"\0"), eod_id
        self._tmp_bin = self.prefix + ".bin.tmp"
        self._tmp_idx = self.prefix + ".idx.tmp"
        self._offsets = array("q", [0])
        self._bin = open(self._tmp_bin, "wb")

    def add_doc(self, ids) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise DataError(f"{self.prefix}: token id out of range [0, {self.vocab_size}) "
                            f"in document {len(self._offsets) - 1}")
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + ids.size)

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_tokens(self) -> int:
        return self._offsets[-1]

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self._code, self.vocab_size, self.fingerprint,
                                 self.eod_id, self.num_docs))
            f.write(np.frombuffer(self._offsets, dtype=np.int64).astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        # .bin first: a reader that opens between the two renames sees a size mismatch, not
        # a silently wrong pairing.
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
