"""Train a reward model or DPO on preference pairs, in any layout.

    torchrun --nproc-per-node=2 examples/preference.py --mode dpo --pairs prefs.jsonl --tokenizer data/chat.tokenizer.json \
        --base runs/sft --run-dir runs/dpo --beta 0.1 --train-iters 100 [--loss-type ipo] [--label-smoothing 0.1] \
        [--nll-weight 1.0]
    python examples/preference.py --mode rm --pairs prefs.jsonl --eval-pairs held.jsonl --tokenizer ... --base runs/sft

Pairs are JSONL {"prompt": str or chat messages, "chosen": str, "rejected": str} (megagpt/align/prefs.py).
--reference: DPO's frozen reference checkpoint (default: the policy's starting weights). DPO runs with dropout
off (model.hidden_dropout / attention_dropout set to 0 with a note, as TRL does: align/base.py). The rest is pretrain.py's
(dotted overrides, --tp/--pp; micro and global batch sizes count rows, two per pair; model.vocab_size
follows the tokenizer with the chat tokens unless given).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    import torch.distributed as dist

    from megagpt.align.chat import add_chat_tokens
    from megagpt.align.prefs import load_pairs
    from megagpt.checkpoint.store import CheckpointError
    from megagpt.cli import launcher_world, parse_args, resolve_config
    from megagpt.config import ConfigError
    from megagpt.data.indexed import DataError
    from megagpt.data.tokenizer import Tokenizer
    from megagpt.parallel.state import init_distributed

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--mode", choices=("dpo", "rm"), required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--eval-pairs")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--base")
    ap.add_argument("--reference")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss-type", default="sigmoid")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--nll-weight", type=float, default=0.0, help="DPO + this x the chosen answer's mean NLL")
    ap.add_argument("--margin", type=float, default=0.0)
    mine, rest = ap.parse_known_args(argv)
    args = parse_args(rest, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml"))
    try:
        from megagpt.align.losses import check_dpo_args
        if mine.mode == "dpo":
            check_dpo_args(mine.beta, mine.loss_type, mine.label_smoothing)       # before any work
        tok = add_chat_tokens(Tokenizer.load(mine.tokenizer))
        pairs = load_pairs(mine.pairs, tok)
        held = load_pairs(mine.eval_pairs, tok) if mine.eval_pairs else None
        if not any(o.startswith("model.vocab_size=") for o in args.overrides):
            args.overrides.append(f"model.vocab_size={tok.vocab_size}")          # the model follows the tokenizer
        cfg = resolve_config(args, launcher_world())
        init_distributed()
        if mine.mode == "dpo":
            from megagpt.align.dpo import DPOTrainer
            tr = DPOTrainer(cfg, args.run_dir, pairs, args.load, held, mine.beta, mine.loss_type, mine.label_smoothing,
                            base=mine.base, reference=mine.reference, nll_weight=mine.nll_weight)
        else:
            from megagpt.align.reward import RewardTrainer
            tr = RewardTrainer(cfg, args.run_dir, pairs, args.load, held, mine.margin, base=mine.base)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tr.run()
    final = tr.evaluate_pairs()
    if tr.ps.rank == 0:
        print("held-out:", json.dumps(final))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
