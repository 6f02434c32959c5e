"""Preference pairs: JSONL {"prompt": ..., "chosen": str, "rejected": str} -> rows for DPO and the reward model.

The prompt is a string (one user turn) or a list of chat messages; it is rendered by the chat template
with the generation prompt (it ends with <|assistant|>), and each answer is its text plus <|end|>.
Rows are interleaved: row 2k is pair k's chosen answer, row 2k+1 its rejected one (a microbatch holds
whole pairs). For DPO a row is (inputs ids[:-1], labels ids[1:] kept on the answer only); for the
reward model it is (ids, the index of its last token, <|end|>: the reward is read there, never from padding).
"""
from __future__ import annotations

import torch

from ..data.indexed import DataError
from ..data.tokenizer import Tokenizer
from ..jsonl import iter_records
from ..model.packing import IGNORE_INDEX
from .chat import END_TOKEN, _encode_plain, apply_chat_template, chat_token_ids


def encode_pair(tokenizer: Tokenizer, rec, where: str = "pair") -> tuple[list[int], list[int], list[int]]:
    """-> (prompt ids, chosen answer ids, rejected answer ids)."""
    if not isinstance(rec, dict) or not all(k in rec for k in ("prompt", "chosen", "rejected")):
        raise DataError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    if not isinstance(rec["chosen"], str) or not isinstance(rec["rejected"], str):
        raise DataError(f"{where}: 'chosen' and 'rejected' must be strings")
    if rec["chosen"] == rec["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer (a pair must differ)")
    prompt = rec["prompt"]
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    ids, _ = apply_chat_template(tokenizer, msgs, add_generation_prompt=True, require_assistant=False, where=where)
    special = set(chat_token_ids(tokenizer).values()) | {tokenizer.eod_id}
    end = tokenizer.token_id(END_TOKEN)
    return ids, _encode_plain(tokenizer, rec["chosen"], special) + [end], _encode_plain(tokenizer, rec["rejected"], special) + [end]


class Pairs(list):
    """The pairs of one file, each with its "path:line" in `where` (errors found later name the line)."""
    where: list


def load_pairs(path: str, tokenizer: Tokenizer) -> Pairs:
    pairs = Pairs()
    pairs.where = []
    for where, rec in iter_records(path, DataError, "pairs file", None,
                                   "an object with 'prompt', 'chosen' and 'rejected'"):
        pairs.append(encode_pair(tokenizer, rec, where))
        pairs.where.append(where)
    if not pairs:
        raise DataError(f"{path}: no preference pairs")
    return pairs


def _rows(pairs, seq_len: int):
    where = getattr(pairs, "where", None)
    for k, (prompt, chosen, rejected) in enumerate(pairs):
        for answer in (chosen, rejected):
            if len(prompt) + len(answer) > seq_len + 1:
                raise DataError(f"{where[k] if where else f'pair {k}'}: {len(prompt) + len(answer)} tokens do not fit "
                                f"train.seq_len={seq_len} (+1)")
            yield prompt, answer


def dpo_rows(pairs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [2n, s], labels [2n, s] (IGNORE_INDEX off the answers and on padding)."""
    rows = list(_rows(pairs, seq_len))
    tokens = torch.zeros(len(rows), seq_len, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        ids = torch.tensor(prompt + answer)
        n = len(ids) - 1
        tokens[i, :n] = ids[:-1]
        labels[i, len(prompt) - 1:n] = ids[len(prompt):]
    return tokens, labels


def reward_rows(pairs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> tokens [2n, s] (right-padded), last [2n]: the index of each row's last real token."""
    rows = list(_rows(pairs, seq_len - 1))
    tokens = torch.zeros(len(rows), seq_len, dtype=torch.long)
    last = torch.zeros(len(rows), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        ids = prompt + answer
        tokens[i, :len(ids)] = torch.tensor(ids)
        last[i] = len(ids) - 1
    return tokens, last
