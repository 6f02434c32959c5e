"""SFT data: JSONL conversations -> an indexed token file plus an indexed loss-mask file -> packed rows.

    PREFIX.bin/.idx        the chat template's token ids, one document per conversation
    PREFIX_mask.bin/.idx   its loss mask (uint8 0/1), the same document sizes, the same tokenizer fingerprint

Both are plain `IndexedDataset`s (no pickle); opening checks that they pair up. A conversation of n
ids gives the inputs ids[:-1] and the labels ids[1:], a label kept where mask[1:] is 1 and
IGNORE_INDEX elsewhere: the model learns the assistant's tokens and <|end|>, never the prompt.
Rows: `SFTRows` packs consecutive samples into rows of seq_len (greedy, in order; a longer sample
is cut to seq_len), or puts one sample per row (packed=False); the rest of a row is padding
(segment 0, label IGNORE_INDEX).
"""
from __future__ import annotations


import numpy as np
import torch

from ..data.indexed import DataError, IndexedDataset, IndexedDatasetBuilder, best_dtype
from ..data.tokenizer import Tokenizer
from ..jsonl import iter_records
from ..model.packing import IGNORE_INDEX
from .chat import apply_chat_template


def mask_prefix(prefix: str) -> str:
    return prefix + "_mask"


def preprocess_conversations(input_path: str, output_prefix: str, tokenizer: Tokenizer) -> dict:
    """JSONL lines {"messages": [{"role", "content"}, ...]} -> the two indexed files. Returns counts."""
    tok_b = IndexedDatasetBuilder(output_prefix, best_dtype(tokenizer.vocab_size), tokenizer.vocab_size,
                                  tokenizer.fingerprint, tokenizer.eod_id)
    mask_b = IndexedDatasetBuilder(mask_prefix(output_prefix), np.uint8, 2, tokenizer.fingerprint, 0)
    trainable = 0
    with tok_b, mask_b:
        for where, rec in iter_records(input_path, DataError, "chat file", None,
                                       "an object with a 'messages' list"):
            if "messages" not in rec:
                raise DataError(f"{where}: expected an object with a 'messages' list")
            ids, mask = apply_chat_template(tokenizer, rec["messages"], where=where)
            tok_b.add_doc(ids)
            mask_b.add_doc(mask)
            trainable += sum(mask)
        if tok_b.num_docs == 0:
            raise DataError(f"{input_path}: no conversations")
        docs, tokens = tok_b.num_docs, tok_b.num_tokens
        tok_b.finalize()
        mask_b.finalize()
    return {"conversations": docs, "tokens": tokens, "trainable_tokens": trainable}


class SFTDataset:
    """Sample i -> (inputs [n-1], labels [n-1]) of conversation i (labels IGNORE_INDEX off the mask)."""

    def __init__(self, prefix: str):
        self.tokens, self.masks = IndexedDataset(prefix), IndexedDataset(mask_prefix(prefix))
        if (len(self.tokens) != len(self.masks) or not np.array_equal(self.tokens.sizes, self.masks.sizes)
                or self.tokens.tokenizer_fingerprint != self.masks.tokenizer_fingerprint):
            raise DataError(f"{self.masks.idx_path}: does not pair with {self.tokens.idx_path} "
                            "(document sizes or tokenizer differ); preprocess them together")
        self.vocab_size = self.tokens.vocab_size

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokens.get(i).astype(np.int64)
        mask = self.masks.get(i).astype(bool)
        labels = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        return ids[:-1], labels

    def lengths(self) -> np.ndarray:
        return self.tokens.sizes - 1


def pack(lengths, seq_len: int, packed: bool = True) -> list[list[int]]:
    """Sample indices of each row: consecutive samples while they fit (each cut to seq_len)."""
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        n = min(int(n), seq_len)
        if cur and (not packed or used + n > seq_len):
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


class SFTRows:
    """Row r -> (tokens [s], labels [s], segment_ids [s]) of the samples `pack` put in it; rows cycle."""

    def __init__(self, data, seq_len: int, packed: bool = True):
        self.data, self.seq_len = data, seq_len
        self.rows = pack(data.lengths(), seq_len, packed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int):
        s = self.seq_len
        tokens = np.zeros(s, np.int64)
        labels = np.full(s, IGNORE_INDEX, np.int64)
        segments = np.zeros(s, np.int64)
        at = 0
        for k, i in enumerate(self.rows[r % len(self.rows)], 1):
            x, y = self.data.sample(i)
            n = min(len(x), s - at)
            tokens[at:at + n], labels[at:at + n], segments[at:at + n] = x[:n], y[:n], k
            at += n
        return tokens, labels, segments


def make_rows_batch(rows, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows -> tokens, labels, segment_ids, each [b, s]."""
    parts = [rows[i] for i in indices]
    return tuple(torch.from_numpy(np.stack([p[k] for p in parts])) for k in range(3))
