"""JSONL with images and audio -> a multimodal indexed dataset (megagpt/multimodal/dataset.py documents it).

    python tools/preprocess_multimodal.py --input data.jsonl --tokenizer tok.json --output-prefix data/mm

Each line is {"text": "... <image> ...", "images": ["digits/0001.png"], "audio": ["dtmf/0001.wav"],
"prompt": "..."} ("images", "audio" and "prompt" optional; media paths relative to the JSONL's folder;
one "<image>"/"<audio>" in prompt + text per medium, in order; the prompt carries no loss). Images are
8x8 grayscale PNGs, audio 16-bit PCM mono WAV at 8 kHz. The tokenizer gets <image> and <audio> if it
lacks them and is saved as PREFIX.tokenizer.json: the model's vocab follows it.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.multimodal.dataset import preprocess_multimodal  # noqa: E402
from megagpt.multimodal.spec import add_media_tokens  # noqa: E402
from megagpt.jsonl import preprocess_tool  # noqa: E402


def main(argv=None) -> int:
    return preprocess_tool(__doc__, "JSONL, one record per line", add_media_tokens, preprocess_multimodal, argv)


if __name__ == "__main__":
    sys.exit(main())
