"""Supervised fine-tuning on chat data in any layout.

    python tools/preprocess_chat.py --input chats.jsonl --tokenizer tok.json --output-prefix data/chat
    torchrun --nproc-per-node=4 examples/finetune.py --config examples/configs/tiny.yaml --tp 2 \
        --data data/chat --eval-data data/chat_held --base runs/pretrained --run-dir runs/sft --train-iters 100 train.lr=1e-4

--base: a pretrained checkpoint (any layout) whose embedding grows to the chat tokenizer's vocab;
--load resumes an SFT run instead. --no-pack puts one conversation per row. --eval-data PREFIX: held-out
conversations for val_loss (without it there is no validation: a training-set loss is never called val_loss).
The rest is pretrain.py's.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from megagpt.align.sft import SFTTrainer
    from megagpt.checkpoint.store import CheckpointError
    from megagpt.cli import launcher_world, parse_args, resolve_config
    from megagpt.config import ConfigError
    from megagpt.data.indexed import DataError
    from megagpt.parallel.state import init_distributed

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--base")
    ap.add_argument("--no-pack", action="store_true")
    ap.add_argument("--eval-data", help="held-out conversations (a tools/preprocess_chat.py prefix) for val_loss")
    mine, rest = ap.parse_known_args(argv)
    args = parse_args(rest, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml"))
    try:
        cfg = resolve_config(args, launcher_world())
        init_distributed()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        trainer = SFTTrainer(cfg, args.run_dir, cfg.data.path, args.load, base=mine.base, packed=not mine.no_pack,
                             eval_data_path=mine.eval_data)
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.run()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
