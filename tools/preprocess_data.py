#!/usr/bin/env python
"""Filter, deduplicate and tokenize text into a memory-mapped indexed dataset.

    python tools/preprocess_data.py --input data/*.jsonl --output-prefix data/corpus \\
        --vocab-size 32000 --workers 8

writes data/corpus.bin, data/corpus.idx, data/corpus.stats.json and data/tokenizer.json.
A thin wrapper over megagpt.data.preprocess.preprocess; see that module for the details.
"""
from __future__ import annotations

import argparse
import sys

from megagpt.data.clean import add_filter_args, filter_config_from_args
from megagpt.data.harmful import HarmConfig
from megagpt.data.indexed import DataError
from megagpt.data.preprocess import SPLIT_TEXT_HELP, preprocess


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSONL files (.jsonl/.json, .gz ok; one document per line) "
                        "or plain-text files (cut into documents by --split-text)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.stats.json")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text")
    p.add_argument("--split-text", default="file", metavar="{file,paragraph,lines:N}", help=SPLIT_TEXT_HELP)
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help="train a byte-level BPE of N tokens, saved as tokenizer.json next to "
                          "the output")
    tok.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer.json")
    p.add_argument("--workers", type=int, default=1, help="processes for filtering and tokenizing")
    p.add_argument("--batch-size", type=int, default=256, help="documents per worker task")
    p.add_argument("--no-filter", action="store_true", help="skip the quality filters")
    p.add_argument("--no-dedup", action="store_true", help="skip exact and near dedup")
    p.add_argument("--no-near-dedup", action="store_true", help="skip near dedup only")
    p.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="estimated Jaccard similarity at or above which a document is a near "
                        "duplicate of a kept one")
    p.add_argument("--shingle-size", type=int, default=5, help="words per shingle for MinHash")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--filter-config", metavar="FILE",
                   help="YAML or JSON mapping of filter thresholds (flags below override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    h = p.add_argument_group("harmful-content curation (megagpt/data/harmful.py)")
    h.add_argument("--harm-filter", action="store_true",
                   help="run the harmful-content stage (classifier, and the word list if given)")
    h.add_argument("--harm-line-threshold", default="0.9", metavar="P",
                   help="alt-profanity-check probability at which a line is flagged; 'none': no classifier")
    h.add_argument("--harm-max-flagged-lines", type=float, default=0.2, metavar="F",
                   help="share of flagged lines above which a document is removed")
    h.add_argument("--harm-wordlist", metavar="FILE", help="words or regexes, one per line")
    h.add_argument("--harm-max-hits-per-1k-words", type=float, default=None, metavar="R",
                   help="word-list matches per 1000 words above which a document is removed "
                        "[default with --harm-wordlist: 5]")
    h.add_argument("--harm-sample-size", type=int, default=50, metavar="N",
                   help="removed documents written to PREFIX.harmful_sample.jsonl for an audit")
    add_filter_args(p)
    return p.parse_args(argv)


def harm_config(args) -> HarmConfig | None:
    if not args.harm_filter:
        return None
    try:
        line = None if args.harm_line_threshold.strip().lower() == "none" else float(args.harm_line_threshold)
    except ValueError:
        raise DataError(f"--harm-line-threshold: cannot parse {args.harm_line_threshold!r}") from None
    patterns = HarmConfig.read_patterns(args.harm_wordlist) if args.harm_wordlist else ()
    rate = args.harm_max_hits_per_1k_words
    if rate is None and patterns:
        rate = 5.0
    return HarmConfig(line, args.harm_max_flagged_lines, patterns, rate, args.harm_sample_size)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = filter_config_from_args(args, args.filter_config)
        harm = harm_config(args)
        preprocess(args.input, args.output_prefix, vocab_size=args.vocab_size,
                   tokenizer=args.tokenizer, json_key=args.json_key, split_text=args.split_text,
                   workers=args.workers,
                   do_filter=not args.no_filter, filter_config=cfg, dedup=not args.no_dedup,
                   near_dedup=not args.no_near_dedup, near_dup_threshold=args.near_dup_threshold,
                   shingle_size=args.shingle_size, num_perm=args.num_perm,
                   batch_size=args.batch_size, progress=not args.quiet, harm=harm)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
