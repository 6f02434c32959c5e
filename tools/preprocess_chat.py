"""JSONL conversations -> PREFIX.bin/.idx (tokens) + PREFIX_mask.bin/.idx (loss mask) for SFT.

    python tools/preprocess_chat.py --input chats.jsonl --tokenizer tok.json --output-prefix data/chat

Each line is {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}. The
tokenizer gets the chat tokens (megagpt/align/chat.py) if it lacks them, and is saved as
PREFIX.tokenizer.json: the model's vocab follows it (the embedding grows; examples/finetune.py --base).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.align.chat import add_chat_tokens  # noqa: E402
from megagpt.align.sft_data import preprocess_conversations  # noqa: E402
from megagpt.jsonl import preprocess_tool  # noqa: E402


def main(argv=None) -> int:
    return preprocess_tool(__doc__, "JSONL, one conversation per line", add_chat_tokens, preprocess_conversations, argv)


if __name__ == "__main__":
    sys.exit(main())
