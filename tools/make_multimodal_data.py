"""The multimodal demo's data, offline: captioned digit images, DTMF tones with transcripts, Shakespeare text.

    python tools/make_multimodal_data.py --out multimodal_data

Writes OUT/digits/*.png, OUT/dtmf/*.wav, the JSONL splits (train = all three kinds shuffled; text_train =
its text alone; held out: digits_test, dtmf_test, text_valid), OUT/tokenizer.json (a BPE trained on the
training text, with <image> and <audio>) and each split preprocessed to OUT/data/<split>
(megagpt/multimodal/synth.py and dataset.py say what each is). Prints the counts as JSON.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.data.indexed import DataError  # noqa: E402
from megagpt.multimodal.synth import build_demo_data  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--dtmf-train", type=int, default=1000)
    ap.add_argument("--dtmf-test", type=int, default=200)
    ap.add_argument("--dtmf-len", type=int, nargs=2, default=(3, 5), metavar=("MIN", "MAX"))
    ap.add_argument("--text-train", type=int, default=2000)
    ap.add_argument("--text-valid", type=int, default=200)
    args = ap.parse_args(argv)
    start = time.time()
    try:
        built = build_demo_data(args.out, args.vocab_size, args.seed, n_dtmf_train=args.dtmf_train,
                                n_dtmf_test=args.dtmf_test, dtmf_len=tuple(args.dtmf_len),
                                n_text_train=args.text_train, n_text_valid=args.text_valid)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**built, "seconds": round(time.time() - start, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
