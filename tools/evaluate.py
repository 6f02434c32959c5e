#!/usr/bin/env python
"""Few-shot evaluation of a megagpt checkpoint on local JSONL tasks: accuracy with a Wilson 95% interval
for each k (default 0, 1, 5).

    python tools/evaluate.py --load runs/tiny --task tasks/capitals.jsonl [--task more.jsonl] --k 0,1,5
    python tools/evaluate.py --load runs/tiny --task qa.jsonl --scoring exact --max-new-tokens 16 --json out.json

Task lines: {"query": ..., "choices": [...], "gold": i} (log-likelihood scoring) or {"query": ...,
"answer": ...} (exact match of the greedy answer); optional "id". Fields are documented in
megagpt/evaluate.py; any other field is refused in one line. Exit codes: 0 ok, 2 bad input.
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
    p.add_argument("--load", required=True, metavar="DIR", help="megagpt checkpoint or HF directory")
    p.add_argument("--task", required=True, action="append", metavar="FILE", help="a JSONL task (repeatable)")
    p.add_argument("--shots-file", metavar="FILE", help="draw the shots from this file instead of the task")
    p.add_argument("--k", default="0,1,5", help="comma-separated shot counts")
    p.add_argument("--scoring", default="auto", choices=["auto", "loglik", "exact"])
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of shots")
    p.add_argument("--limit", type=int, help="evaluate the first N examples of each task")
    p.add_argument("--max-new-tokens", type=int, default=32, help="exact match: the answer's length limit")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokenizer", metavar="FILE")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers, got {text!r}") from None
    if not ks or any(k < 0 for k in ks):
        raise ValueError(f"--k: expected non-negative shot counts, got {text!r}")
    return ks


def run(args) -> int:
    from megagpt.evaluate import evaluate, read_task, scoring_of
    from megagpt.loading import load_for_generation
    ks = parse_ks(args.k)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit: expected a positive number of examples, got {args.limit}")
    tasks = {path: read_task(path) for path in args.task}           # every file checked before loading
    for path, ex in tasks.items():
        scoring_of(ex, args.scoring, path)
    pool = read_task(args.shots_file) if args.shots_file else None
    chunks, _, tok, _ = load_for_generation(args.load, tokenizer=args.tokenizer)
    if tok is None:
        raise ValueError("--load: the checkpoint has no tokenizer; pass --tokenizer FILE")
    results = []
    print(f"{'task':<28} {'k':>2} {'n':>5} {'scoring':>7} {'accuracy':>9}   95% CI (Wilson)")
    for path, examples in tasks.items():
        examples = examples[:args.limit] if args.limit else examples
        for k in ks:
            r = evaluate(chunks, tok, examples, k, args.scoring, args.seed, pool, args.max_new_tokens,
                         args.batch_size)
            r["task"] = os.path.basename(path)
            results.append(r)
            print(f"{r['task']:<28} {k:>2} {r['n']:>5} {r['scoring']:>7} {r['accuracy']:>9.3f}   "
                  f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", flush=True)
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        return run(args)
    except ERRORS as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"evaluate: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
