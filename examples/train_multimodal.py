"""Multimodal training (text, images, audio) in any layout without CP: the SFT loop with media.

    python tools/make_multimodal_data.py --out data/mm
    torchrun --nproc-per-node=2 examples/train_multimodal.py --config examples/configs/multimodal-tiny.yaml \
        --data data/mm/data/train --valid data/mm/data/text_valid --run-dir runs/mm train.freeze_lm=false
    python tools/generate.py --load runs/mm --prompt "<image>" --image data/mm/digits/0003.png --greedy

The placeholder ids (model.image_token_id, model.audio_token_id) and the vocab come from the dataset unless
given; train.freeze_lm=true trains the adapters only. --no-pack puts one sample per row. The rest is
pretrain.py's (--tp, --pp, --load, dotted overrides).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    import torch
    import torch.distributed as dist

    from megagpt.cli import launcher_world, parse_args, resolve_config
    from megagpt.loading import INPUT_ERRORS
    from megagpt.parallel.state import init_distributed

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--valid", help="a multimodal dataset prefix for validation (default: none, no val_loss)")
    ap.add_argument("--no-pack", action="store_true")
    mine, rest = ap.parse_known_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    args = parse_args(rest, os.path.join(here, "configs", "multimodal-tiny.yaml"))
    try:
        if not args.data:
            raise ValueError("--data: a multimodal dataset prefix (tools/preprocess_multimodal.py) is required")
        from megagpt.multimodal.dataset import MultimodalDataset
        data = MultimodalDataset(args.data)                  # checked before any work
        given = " ".join(args.overrides)
        args.overrides += [f"model.{f}={tid}" for f, tid in (("image_token_id", data.image_id),
                                                             ("audio_token_id", data.audio_id)) if f"model.{f}=" not in given]
        cfg = resolve_config(args, launcher_world())
        init_distributed()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        from megagpt.multimodal.trainer import MultimodalTrainer
        trainer = MultimodalTrainer(cfg, args.run_dir, args.data, mine.valid, args.load, packed=not mine.no_pack)
    except INPUT_ERRORS as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        if dist.is_initialized():  # refused after start-up: the caller's process (a test) must not keep this world
            dist.destroy_process_group()
        return 2
    trainer.run()
    trainer.save()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
