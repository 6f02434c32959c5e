"""JSONL conversations -> PREFIX.bin/.idx (tokens) + PREFIX_mask.bin/.idx (loss mask) for SFT.

    python tools/preprocess_chat.py --input chats.jsonl --tokenizer tok.json --output-prefix data/chat

Each line is {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}. The
tokenizer gets the chat tokens (megagpt/align/chat.py) if it lacks them, and is saved as
PREFIX.tokenizer.json: the model's vocab follows it (the embedding grows; examples/finetune.py --base).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.align.chat import add_chat_tokens  # noqa: E402
from megagpt.align.sft_data import preprocess_conversations  # noqa: E402
from megagpt.data.indexed import DataError  # noqa: E402
from megagpt.data.tokenizer import Tokenizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="JSONL, one conversation per line")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json (chat tokens are added if missing)")
    ap.add_argument("--output-prefix", required=True)
    args = ap.parse_args(argv)
    try:
        if not os.path.isfile(args.input):
            raise DataError(f"{args.input}: file not found")
        tok = add_chat_tokens(Tokenizer.load(args.tokenizer))
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        stats = preprocess_conversations(args.input, args.output_prefix, tok)
        tok.save(args.output_prefix + ".tokenizer.json")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**stats, "vocab_size": tok.vocab_size, "tokenizer": args.output_prefix + ".tokenizer.json"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
