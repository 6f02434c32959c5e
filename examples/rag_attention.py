"""Where the RAG demo's reader looks when it answers: attention from "answer:" or the asked first name.

Reads a finished `make rag-demo` run (its checkpoint and index), builds the top-3 prompts of the first N
knowledge-base questions, and averages each layer's and head's attention weights from "answer:" over the
prompt's positions, labelled by role: `gold@k` / `other@k` is the k-th token of the gold passage or of
another passage (1 the id, 2 and 3 the first and last name, 4 the city, 5 the year, 6 the trade) and
`q@k` the k-th token of a question line (1 "question:", 2 the question word, 8 or 9 "answer:").
A reader that tells the person asked apart must weight the gold passage above the others somewhere:
from "answer:" (the default), or from the repeated question's tokens that "answer:" reads (`--from
name`: the first name in the question just before "answer:"; the record-format reader of stop 27 reads
the question from "answer:" and matches the name there).

    python examples/rag_attention.py [--run rag_demo_run] [--seed 0] [--questions 300] [--from answer|name]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import rag_demo as demo  # noqa: E402
from megagpt.loading import load_for_generation  # noqa: E402
from megagpt.model import attention  # noqa: E402
from megagpt.rag import Index, build_prompt  # noqa: E402


def roles(words: list[str], gold_pid: str) -> list[tuple[str, int]]:
    """Each token's (passage or question role, 1-based place within its passage or question line)."""
    out, role, place = [], None, 0
    for w in words:
        if w.startswith("[p"):
            role, place = ("gold" if w == f"[{gold_pid}#0]" else "other"), 0
        elif w == "question:":
            role, place = "q", 0
        place += 1
        out.append((role, place))
    return out


def query_position(words: list[str], source: str) -> int:
    """Index of the query token: "answer:" (the last) or the first name of the last question line, the
    third word after its "question:" in every template of the demo."""
    return len(words) - 1 if source == "answer" else len(words) - 1 - words[::-1].index("question:") + 3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="rag_demo_run")
    ap.add_argument("--seed", type=int, default=0, help="the demo's --seed (it invents the world)")
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--from", dest="source", choices=("answer", "name"), default="answer",
                    help='the query position: "answer:", or the first name of the question just before it')
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    chunks, _, tok, _ = load_for_generation(os.path.join(args.run, "ckpt"))
    model, index = chunks[0].eval(), Index.load(os.path.join(args.run, "index"))
    kb, _ = demo.invent_world(args.seed)
    caught: list[torch.Tensor] = []
    core = attention.Attention._core

    def recording_core(self, q, k, v, mask=None):          # q, k [b, s, heads, d]: weights of one query
        # the query at `at` sees the keys up to it (causal): only that row, not the whole [s, s] matrix
        w = torch.einsum("bhd,bkhd->bhk", q[:, at], k[:, :at + 1]) / math.sqrt(q.shape[-1])
        caught.append(w[0].softmax(-1))                  # [heads, at + 1]
        return core(self, q, k, v, mask)

    attention.Attention._core = recording_core
    weight: dict = defaultdict(float)
    qs = demo.questions(kb)[:args.questions]
    try:
        for person, _, q in qs:
            ids = tok.encode(build_prompt(q, [p for p, _ in index.search(q, 3)]))
            words = [tok.decode([i]) for i in ids]
            labels = roles(words, person["id"])
            at = query_position(words, args.source)               # labels after `at` get no weight
            caught.clear()
            with torch.no_grad():
                model(torch.tensor([ids]))
            for layer, w in enumerate(caught):
                for head, row in enumerate(w.tolist()):
                    for label, x in zip(labels, row):
                        weight[(layer, head) + label] += x / len(qs)
    finally:
        attention.Attention._core = core
    summary = {}
    for layer, head in sorted({key[:2] for key in weight}):
        top = sorted(((v, f"{r}@{p}") for (la, h, r, p), v in weight.items() if (la, h) == (layer, head)),
                     reverse=True)[:8]
        summary[f"layer {layer + 1} head {head + 1}"] = {name: round(v, 3) for v, name in top}
        print(f"layer {layer + 1} head {head + 1}: " + "  ".join(f"{name} {v:.2f}" for v, name in top))
    return summary


if __name__ == "__main__":
    main()
