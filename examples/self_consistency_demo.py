"""Self-consistency on a small reasoning task: accuracy against the number of sampled chains N.

A tiny model of the flagship architecture learns two-digit addition ("23+45=68\\n", one token per
character) for a few hundred steps on the CPU, on purpose not to convergence, so a single sampled
answer is often wrong. On held-out sums, N chains are sampled at temperature 1 from one prefill of
the prompt, the answer is pulled out with a regex, and the majority answer is scored.
Prints a table and its JSON. About 20 s on one core:
    python examples/self_consistency_demo.py [steps]          # make self-consistency-demo
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.config import ModelConfig  # noqa: E402
from megagpt.model.gpt import build_model  # noqa: E402
from megagpt.sampling import Sampling  # noqa: E402
from megagpt.self_consistency import regex_extractor, self_consistency  # noqa: E402

CHARS = "0123456789+=\n"
EOD = CHARS.index("\n")


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def decode(ids) -> str:
    return "".join(CHARS[i] for i in ids)


def problems(seed: int = 0):
    pairs = [(a, b) for a in range(50) for b in range(50)]
    random.Random(seed).shuffle(pairs)
    cut = int(0.8 * len(pairs))
    return pairs[:cut], pairs[cut:]


def train(pairs, steps: int, seed: int = 0):
    cfg = ModelConfig(vocab_size=len(CHARS), max_seq_len=16, hidden_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, ffn_hidden_size=128, make_vocab_divisible_by=1, use_flash_attn=False)
    model = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    width = 10                                               # "49+49=98\n" is 9 tokens; pad with EOD
    for _ in range(steps):
        rows = [encode(f"{a}+{b}={a + b}\n") for a, b in rng.choices(pairs, k=64)]
        data = torch.tensor([r + [EOD] * (width - len(r)) for r in rows])
        loss_mask = torch.zeros_like(data[:, 1:], dtype=torch.float32)
        for i, r in enumerate(rows):                         # learn only the answer and its EOD
            eq = r.index(CHARS.index("="))
            loss_mask[i, eq:len(r) - 1] = 1.0
        losses = model(data[:, :-1], data[:, 1:])            # [b, s]
        loss = (losses * loss_mask).sum() / loss_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model, pairs, n: int, seed: int, sample: bool = True) -> tuple[float, float]:
    """(share of sums whose majority answer is right, mean agreement rate of the vote)."""
    extract = regex_extractor(r"^(\d+)", decode)
    right, agree = 0, 0.0
    for k, (a, b) in enumerate(pairs):
        vote = self_consistency(model, encode(f"{a}+{b}="), n, 4, Sampling(do_sample=sample, temperature=1.0,
                                                                          seed=seed + k), extract, eod_id=EOD)
        right += vote.answer == str(a + b)
        agree += vote.agreement
    return right / len(pairs), agree / len(pairs)


def main(steps: int = 500, questions: int = 500, ns=(1, 5, 10, 20)) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train_pairs, test_pairs = problems()
    model = train(train_pairs, steps)
    test = test_pairs[:questions]
    res = {n: accuracy(model, test, n, seed=1000 * n) for n in ns}
    greedy = accuracy(model, test, 1, 0, sample=False)[0]
    print(f"two-digit addition, {len(test)} held-out sums, a model trained {steps} steps "
          f"({time.perf_counter() - t0:.0f} s in all); greedy accuracy {greedy:.3f}")
    for n, (acc, agree) in res.items():
        print(f"  N = {n:>2} chains at temperature 1: majority-vote accuracy {acc:.3f}, mean agreement {agree:.2f}")
    print(json.dumps({"steps": steps, "questions": len(test), "greedy": greedy,
                      "majority_vote": {str(n): {"accuracy": acc, "agreement": agree} for n, (acc, agree) in res.items()},
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return res


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
