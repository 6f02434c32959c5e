#!/usr/bin/env python
"""Convert checkpoints: megagpt (any TP/PP/VP/EP/DP layout) <-> Hugging Face Llama or Mixtral, and resharding.

    python tools/convert_checkpoint.py --input runs/tiny --output hf_out --to hf [--max-shard-size 2GB]
    python tools/convert_checkpoint.py --input hf_llama --output runs/imported --to megagpt --tp 2 --pp 2
    python tools/convert_checkpoint.py --input runs/tiny --output runs/tp1pp4 --to megagpt --tp 1 --pp 4 \\
        --with-optimizer
    python tools/convert_checkpoint.py --input hf_mixtral --output runs/moe --to megagpt --ep 2

The input's format is detected: a directory with config.json is HF, else a megagpt run directory or
step directory (with a COMPLETE manifest). The output of --to megagpt is a published checkpoint that
training resumes from with --load (dp=1 on disk; any DP loads it). --with-optimizer carries the Adam
state over (HF input: a fresh state at step 0); training's --load needs it. Tensors stream one layer
at a time. Post-training checkpoints (megagpt/align/) export too: SFT and DPO policies as Llama with
their grown vocab; a PPO policy as Llama plus value_head.safetensors (its value head, [1, hidden]); a
reward model as LlamaForSequenceClassification (num_labels=1, score.weight; pad_token_id = the eos token,
so HF reads the reward at the last token that is not padding; --tokenizer is required). A tokenizer
with the chat tokens gets the chat template (align/chat.py) in tokenizer_config.json. A thin wrapper over megagpt.checkpoint.convert. Exit codes: 0 ok, 2 bad input or arguments.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from megagpt.checkpoint.convert import convert
from megagpt.checkpoint.hf import ConversionError
from megagpt.checkpoint.store import CheckpointError
from megagpt.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, metavar="SRC", help="megagpt run/step directory or HF directory")
    p.add_argument("--output", required=True, metavar="DST", help="directory to write (HF: must not exist "
                                                                   "or be empty; megagpt: a run directory)")
    p.add_argument("--to", required=True, choices=["hf", "megagpt"])
    p.add_argument("--tp", type=int, default=1, help="--to megagpt: tensor-parallel degree (default 1)")
    p.add_argument("--pp", type=int, default=1, help="--to megagpt: pipeline stages (default 1)")
    p.add_argument("--vp", type=int, default=1, help="--to megagpt: virtual stages per pipeline rank (default 1)")
    p.add_argument("--ep", type=int, default=1, help="--to megagpt: expert-parallel degree (MoE; default 1): the "
                                                     "experts split over ep ranks, dp = ep on disk")
    p.add_argument("--with-optimizer", action="store_true",
                   help="--to megagpt: write optimizer state (carried over; fresh for HF input)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="weights' dtype (default: the input's)")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="--to hf: split the weights into shards of at most SIZE (2GB, 500MiB, bytes; default 2GB)")
    p.add_argument("--tokenizer", metavar="FILE", help="--to hf: tokenizer.json to include (default: the run's "
                                                       "data.tokenizer, or tokenizer.json next to data.path)")
    p.add_argument("--seed", type=int, default=1234, help="--to megagpt from HF: the seed of the step-0 RNG "
                                                          "state, as train.seed would seed it (default 1234)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = convert(args.input, args.output, args.to, tp=args.tp, pp=args.pp, vp=args.vp, ep=args.ep,
                          with_optimizer=args.with_optimizer, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          tokenizer=args.tokenizer, seed=args.seed)
    except (ConversionError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary.update(seconds=round(time.perf_counter() - start, 2),
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if args.json:
        print(json.dumps(summary))
    else:
        what = (f"{len(summary['files'])} safetensors file(s), {summary['tensors']} tensors"
                + (f", tokenizer from {summary['tokenizer']}" if summary["tokenizer"] else ", no tokenizer")
                + "".join(f", {h}" for h in summary["heads"])
                if args.to == "hf" else
                f"step {summary['step']} in {summary['ranks']} rank files at {summary['path']}"
                + (", with optimizer state" if summary["optimizer"] else ""))
        print(f"wrote {args.output}: {what} ({summary['seconds']} s, peak RSS {summary['peak_rss_mb']} MB)")
        if args.to == "megagpt" and not summary["optimizer"]:
            print("note: no optimizer state written; resuming training with --load needs --with-optimizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
