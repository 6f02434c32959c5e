"""Self-consistency decoding: N sampled reasoning chains for one prompt, an answer pulled from each, and the
majority answer with its agreement rate. The prompt is prefilled once; its KV cache is copied to the N
chains (`KVCache.repeat`), so the N chains cost N decodes but one prefill. Many prompts can be voted in one
batch (`self_consistency_batch`), each still prefilled once."""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .generate import generate_ids
from .sampling import Sampling


@dataclass
class Vote:
    answer: str | None            # the most frequent answer (None if no chain gave one)
    agreement: float              # share of the N chains that gave it
    counts: dict[str, int]        # every extracted answer and how many chains gave it
    chains: list[list[int]]       # the generated ids of every chain
    answers: list[str | None]     # each chain's extracted answer


def majority_vote(answers: list[str | None]) -> tuple[str | None, float, dict[str, int]]:
    """The most frequent answer (ties: the one seen first), its share of all chains, the counts. None and
    "" are no answer (a regex can match only blanks), so they count in the share's denominator only."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None, 0.0, {}
    best = max(counts, key=lambda a: (counts[a], -answers.index(a)))
    return best, counts[best] / len(answers), dict(counts)


def regex_extractor(pattern: str, decode: Callable[[list[int]], str]) -> Callable[[list[int]], str | None]:
    """ids -> the pattern's first group (or whole match) in the decoded text, last match wins; None if absent."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"answer regex: {pattern!r} does not compile ({e})") from None

    def extract(ids: list[int]) -> str | None:
        found = list(rx.finditer(decode(ids)))
        if not found:
            return None
        m = found[-1]
        return (m.group(1) if rx.groups else m.group(0)).strip()
    return extract


def self_consistency_batch(chunks, prompts: list[list[int]], n: int, max_new_tokens: int, sampling: Sampling,
                           extract: Callable[[list[int]], str | None], **kwargs) -> list[Vote]:
    """One Vote per prompt: N chains sampled from it (sampling.do_sample must be on), voted. All prompts go
    in one batch, each prefilled once. kwargs go to generate_ids (ps, eod_id, stop, on_token)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"self_consistency: expected a positive number of chains, got {n!r}")
    if not sampling.do_sample and n > 1:
        raise ValueError("self_consistency: greedy chains are all the same; sample (temperature/top-k/top-p)")
    chains = generate_ids(chunks, prompts, max_new_tokens, sampling, num_samples=n, **kwargs)
    votes = []
    for i in range(len(prompts)):                 # row i's chains are rows i*n .. i*n+n-1
        mine = chains[i * n:(i + 1) * n]
        answers = [extract(c) for c in mine]
        votes.append(Vote(*majority_vote(answers), mine, answers))
    return votes


def self_consistency(chunks, prompt: list[int], n: int, max_new_tokens: int, sampling: Sampling,
                     extract: Callable[[list[int]], str | None], **kwargs) -> Vote:
    """N chains sampled from `prompt`, voted (self_consistency_batch of one prompt)."""
    return self_consistency_batch(chunks, [prompt], n, max_new_tokens, sampling, extract, **kwargs)[0]
