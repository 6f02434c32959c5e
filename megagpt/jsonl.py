"""The one JSONL record reader of the project's inputs (RAG corpora, evaluation tasks, chat data):
one JSON object per line, blank lines skipped, and every bad line a one-line error naming the file,
line and, for an unknown field, the field."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator


def iter_records(path: str, error: type[Exception], what: str, fields=None,
                 expected: str = "a JSON object") -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for each non-blank line of `path`, where = "path:line". `what` names the
    file in the not-found error ("task file"); `fields`, if given, are the only keys allowed."""
    if not os.path.isfile(path):
        raise error(f"{path}: {what} not found")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(rec, dict):
                raise error(f"{where}: expected {expected}")
            for key in rec if fields is not None else ():
                if key not in fields:
                    raise error(f"{where}: unknown field {key!r} (expected {', '.join(fields)})")
            yield where, rec


def preprocess_tool(doc: str, input_help: str, grow, preprocess, argv=None) -> int:
    """main() of a JSONL -> indexed dataset tool (tools/preprocess_chat.py, preprocess_multimodal.py): --input,
    --tokenizer (grown by `grow` with the tool's special tokens, saved as PREFIX.tokenizer.json), --output-prefix;
    `preprocess(input, prefix, tokenizer)` returns the counts printed as JSON. Bad input: one line, exit 2."""
    import argparse
    import sys

    from .data.indexed import DataError
    from .data.tokenizer import Tokenizer
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--input", required=True, help=input_help)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json (the tool's special tokens are added if missing)")
    ap.add_argument("--output-prefix", required=True)
    args = ap.parse_args(argv)
    try:
        if not os.path.isfile(args.input):
            raise DataError(f"{args.input}: file not found")
        tok = grow(Tokenizer.load(args.tokenizer))
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        stats = preprocess(args.input, args.output_prefix, tok)
        tok.save(args.output_prefix + ".tokenizer.json")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**stats, "vocab_size": tok.vocab_size, "tokenizer": args.output_prefix + ".tokenizer.json"}))
    return 0
