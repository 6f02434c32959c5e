"""The flagship run: gpt4plus-70b.

    torchrun --nnodes=N --nproc-per-node=8 ... examples/pretrain_70b.py --data PREFIX [--tp 8 --pp 4]
    python examples/pretrain_70b.py --dry-run [--json] [--tp T --pp P --vp V --world-size W]

The dry run builds every stage on the meta device (no memory) and prints the parameter counts.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megagpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_config=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "configs", "gpt4plus-70b.yaml"), use_planner=True))
