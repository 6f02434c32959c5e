#!/usr/bin/env python
"""Retrieval-augmented generation: build a BM25 index over a JSONL corpus, then answer questions with the
top-k passages in the prompt; the answer cites the passage ids it drew on.

    python tools/rag.py index --corpus kb.jsonl --out kb_index [--chunk-words 100 --overlap 20]
    python tools/rag.py ask --index kb_index --load runs/rag --question "where was Ilsa Varn born ?" -k 3
    python tools/rag.py ask --index kb_index --load runs/rag --question "..." --read each   # one passage a prompt
    python tools/rag.py ask --index kb_index --question "..." --retrieve-only      # no model: passages only

Corpus lines: {"id": ..., "text": ..., "title": optional}. `ask` prints the retrieved passages, the
answer, and the cited ids (those among the retrieved passages, then any it made up); --json prints one
JSON object instead. --read together (the default) puts the k passages in one prompt; --read each asks
the question with one passage at a time, picks the passage the reader is least likely to answer
--no-answer for (megagpt/rag.py: most_relevant) and answers from it, printing each passage's p(no answer);
that needs a reader trained to answer --no-answer for an unrelated passage (examples/rag_demo.py --read each).
Exit codes: 0 ok, 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megagpt.loading import INPUT_ERRORS  # noqa: E402

ERRORS = INPUT_ERRORS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ix = sub.add_parser("index", help="build a BM25 index over a JSONL corpus")
    ix.add_argument("--corpus", required=True, metavar="FILE")
    ix.add_argument("--out", required=True, metavar="DIR")
    ix.add_argument("--chunk-words", type=int, default=100)
    ix.add_argument("--overlap", type=int, default=20)
    ix.add_argument("--k1", type=float, default=1.5)
    ix.add_argument("--b", type=float, default=0.75)
    ask = sub.add_parser("ask", help="retrieve top-k passages and answer with citations")
    ask.add_argument("--index", required=True, metavar="DIR")
    ask.add_argument("--question", required=True)
    ask.add_argument("-k", "--top-k", dest="k", type=int, default=3, help="passages put in the prompt")
    ask.add_argument("--load", metavar="DIR", help="megagpt checkpoint or HF directory")
    ask.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the checkpoint's)")
    ask.add_argument("--max-new-tokens", type=int, default=32)
    ask.add_argument("--read", choices=("together", "each"), default="together",
                     help="the k passages in one prompt, or one passage a prompt and answer from the most relevant")
    ask.add_argument("--no-answer", default=None, metavar="TEXT",
                     help="with --read each: what the reader answers for an unrelated passage (default: unknown)")
    ask.add_argument("--retrieve-only", action="store_true", help="print the passages and the prompt only")
    ask.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def cmd_index(args) -> int:
    from megagpt.rag import Index
    index = Index.from_corpus(args.corpus, args.chunk_words, args.overlap, k1=args.k1, b=args.b)
    index.save(args.out)
    docs = len({p.doc_id for p in index.passages})
    print(f"indexed {docs} documents as {len(index.passages)} passages into {args.out}")
    return 0


def answer(chunks, tok, eod, question: str, hits, max_new_tokens: int) -> str:
    """The model's greedy answer to the RAG prompt, up to a newline or EOD."""
    from megagpt.generate import generate_ids
    from megagpt.rag import build_prompt
    prompt = tok.encode(build_prompt(question, [p for p, _ in hits]))
    stop = lambda ids: "\n" in tok.decode(ids)  # noqa: E731
    ids = generate_ids(chunks, [prompt], max_new_tokens, eod_id=eod, stop=stop)[0]
    return tok.decode([t for t in ids if t != eod]).split("\n")[0].strip()


def cmd_ask(args) -> int:
    from megagpt.rag import (NO_ANSWER, Index, build_prompt, check_no_answer, citations, most_relevant,
                             no_answer_probs, strip_citations)
    if not args.retrieve_only and not args.load:
        raise ValueError("ask: --load DIR is required (or pass --retrieve-only)")
    if args.no_answer is not None and args.read != "each":
        raise ValueError("ask: --no-answer is for --read each")
    no_answer = check_no_answer(NO_ANSWER if args.no_answer is None else args.no_answer)   # before any loading
    index = Index.load(args.index)
    hits = index.search(args.question, args.k)
    out = {"question": args.question, "passages": [{"id": p.pid, "score": s, "text": p.text} for p, s in hits]}
    if args.retrieve_only:
        shown = [[p] for p, _ in hits] if args.read == "each" else [[p for p, _ in hits]]
        out["prompt"] = "\n\n".join(build_prompt(args.question, ps) for ps in shown)
    else:
        from megagpt.loading import load_for_generation
        chunks, ps, tok, eod = load_for_generation(args.load, tokenizer=args.tokenizer)
        if tok is None:
            raise ValueError("ask: the checkpoint has no tokenizer; pass --tokenizer FILE")
        read = hits
        if args.read == "each":          # one passage a prompt: answer from the one the reader finds relevant
            p_none = no_answer_probs(chunks, tok, args.question, [p for p, _ in hits], no_answer)
            for h, pn in zip(out["passages"], p_none):
                h["p_no_answer"] = pn
            read = [hits[most_relevant(p_none)]]
            out["read_from"] = read[0][0].pid
        text = answer(chunks, tok, eod, args.question, read, args.max_new_tokens)
        cited, made_up = citations(text, [p.pid for p, _ in hits])
        out.update(answer=strip_citations(text), raw=text, cited=cited, unknown_ids=made_up)
    if args.json:
        print(json.dumps(out))
        return 0
    for h in out["passages"]:
        pn = f" p(no answer) {h['p_no_answer']:.3f}" if "p_no_answer" in h else ""
        print(f"[{h['id']}] ({h['score']:.2f}{pn}) {h['text']}")
    if args.retrieve_only:
        print("--- prompt ---\n" + out["prompt"])
    else:
        if "read_from" in out:
            print(f"read from: [{out['read_from']}]")
        print(f"answer: {out['answer']}\ncited: {' '.join(out['cited']) or '(none)'}"
              + (f"\nids not among the passages: {' '.join(made_up)}" if made_up else ""))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        return cmd_index(args) if args.cmd == "index" else cmd_ask(args)
    except ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"rag: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
