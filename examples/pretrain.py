"""Pretrain a megagpt model in any layout.

    torchrun --nproc-per-node=8 examples/pretrain.py --config examples/configs/tiny.yaml \
        --tp 2 --pp 2 --data data/shakespeare --run-dir runs/tiny --train-iters 100 --save-interval 20

DP is what remains of the world size. Dotted overrides change any config field: train.lr=1e-3.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")))
