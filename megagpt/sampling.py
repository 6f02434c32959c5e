"""Choosing the next token from the logits: repetition penalty, temperature, top-k, top-p, seeded draws.

The draw is explicit (one uniform number per row from a seeded torch.Generator, looked up in the
cumulative distribution), so the same logits and seed give the same token in every layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Sampling:
    do_sample: bool = False              # False: greedy (argmax after the repetition penalty)
    temperature: float = 1.0
    top_k: int = 0                       # 0: no top-k cut
    top_p: float = 1.0                   # nucleus: the smallest set of tokens with this much probability
    repetition_penalty: float = 1.0      # > 1 discourages tokens already in the row (prompt or generated)
    seed: int = 0

    def validate(self) -> "Sampling":
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling.top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling.temperature: expected a positive number, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"sampling.top_k: expected a non-negative integer, got {self.top_k!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise ValueError(f"sampling.repetition_penalty: expected a positive number, got {self.repetition_penalty!r}")
        return self


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [b, V], seen [b, V] bool: seen tokens' logits divided by penalty when positive, else
    multiplied (the CTRL rule, as transformers does it)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[b, V] -> [b, V] with the tokens outside top-k and outside the top-p nucleus at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p                  # mass before this token already reaches p
        drop[:, 0] = False                                        # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, cfg: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits [b, V] (fp32), seen [b, V] -> token ids [b]."""
    logits = penalize(logits.float(), seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    cdf = probs.cumsum(-1)
    # (1 - u) in (0, 1], scaled by the total: never lands on a zero-probability token, never overflows
    idx = torch.searchsorted(cdf, (1 - u) * cdf[:, -1:]).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)
