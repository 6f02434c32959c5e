"""Text generation from a one-process model: greedy or top-k sampling, no KV cache (the models this
runs on are small; it re-runs the prefix each step, which keeps it obviously correct)."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt: torch.Tensor, new_tokens: int, top_k: int = 0, temperature: float = 1.0,
             generator: torch.Generator | None = None, eod_id: int | None = None) -> torch.Tensor:
    """prompt [b, s] -> [b, s + new_tokens]. top_k = 0 means greedy."""
    model.eval()
    tokens = prompt
    for _ in range(new_tokens):
        window = tokens[:, -model.cfg.max_seq_len:]
        logits = model.gather_logits(model(window))[:, -1, :].float()     # [b, vocab]
        if top_k:
            logits = logits / temperature
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        if eod_id is not None and bool((nxt == eod_id).all()):
            break
    return tokens
