"""Byte-level BPE tokenizer: a thin wrapper over HF `tokenizers`.

Byte-level pre-tokenization plus the ByteLevel decoder make every string round-trip exactly
(decode(encode(x)) == x): no normalizer, no prefix space, special tokens kept on decode. The
end-of-document token is only ever produced by the pipeline, never by encoding text that happens
to contain "<|endoftext|>".
The fingerprint (sha256 of vocab + merges + added tokens, 16 hex chars) is written into every
.idx file so training can check it reads data made with the tokenizer it expects.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

from megagpt.data.indexed import DataError

EOD_TOKEN = "<|endoftext|>"


def _fingerprint(tokenizer_json: str) -> str:
    model = json.loads(tokenizer_json).get("model", {})
    vocab = model.get("vocab", {})
    if isinstance(vocab, dict):
        vocab = sorted(vocab.items(), key=lambda kv: kv[1])
    # Merges are "a b" strings in older files and ["a", "b"] pairs in newer ones: same tokenizer.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = sorted((t["id"], t["content"]) for t in json.loads(tokenizer_json).get("added_tokens", []))
    blob = json.dumps({"vocab": vocab, "merges": merges, "added": added},
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class Tokenizer:
    """encode/decode, vocab_size, eod_id and fingerprint of a tokenizers.Tokenizer."""

    def __init__(self, hf_tokenizer, eod_token: str = EOD_TOKEN, source: str = "tokenizer"):
        self._tok = hf_tokenizer
        eod = hf_tokenizer.token_to_id(eod_token)
        if eod is None:
            raise DataError(f"{source}: has no end-of-document token {eod_token!r}")
        self.eod_token = eod_token
        self.eod_id = int(eod)
        self.vocab_size = int(hf_tokenizer.get_vocab_size(with_added_tokens=True))
        self.fingerprint = _fingerprint(hf_tokenizer.to_str())

    @classmethod
    def train(cls, iterator: Iterable[str], vocab_size: int,
              special: Iterable[str] = (EOD_TOKEN,), length: int | None = None,
              show_progress: bool = False) -> Tokenizer:
        """Train a byte-level BPE with `vocab_size` entries (256 bytes + specials + merges).

        The first special token is the end-of-document token. Training is deterministic for a
        given corpus order, so the same input gives the same tokenizer (and fingerprint).
        """
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        special = list(special)
        if not special:
            raise DataError("tokenizer training needs at least the end-of-document special token")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special):
            raise DataError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at "
                            f"least {len(alphabet) + len(special)} (256 bytes + special tokens)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                      initial_alphabet=alphabet, show_progress=show_progress)
        tok.train_from_iterator(iterator, trainer, length=length)
        return cls(tok, eod_token=special[0])

    @classmethod
    def load(cls, path: str | os.PathLike, eod_token: str = EOD_TOKEN) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = str(path)
        if not os.path.isfile(path):
            raise DataError(f"{path}: tokenizer file not found")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{path}: not a valid tokenizer.json ({first_line})") from None
        return cls(tok, eod_token=eod_token, source=path)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (temp file + rename)."""
        path = str(path)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._tok.to_str(pretty=True))
        os.replace(tmp, path)

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A copy with `tokens` added as special tokens (new ids after the current vocab; ones it
        already has keep their ids): the chat template's role markers (megagpt/align/chat.py)."""
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.add_special_tokens([t for t in tokens if tok.token_to_id(t) is None])
        return Tokenizer(tok, eod_token=self.eod_token)

    def token_id(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        for i, text in enumerate(texts):
            if self.eod_token in text:
                out[i] = self._encode_literal_eod(text)
        return out

    def _encode_literal_eod(self, text: str) -> list[int]:
        # tokenizers maps the literal string "<|endoftext|>" to the special token, which would
        # plant a fake document boundary (web text and code do contain it). Encode it as plain
        # bytes instead, in two pieces so the special-token matcher cannot see it whole.
        literal = (self._tok.encode(self.eod_token[:1], add_special_tokens=False).ids
                   + self._tok.encode(self.eod_token[1:], add_special_tokens=False).ids)
        ids: list[int] = []
        for k, part in enumerate(text.split(self.eod_token)):
            if k:
                ids += literal
            ids += self._tok.encode(part, add_special_tokens=False).ids
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

