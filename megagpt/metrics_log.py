"""What a training run reports on rank 0: console lines under a progress bar, metrics.jsonl,
TensorBoard scalars and, at the end, the loss curves as a PNG (megagpt/plot.py)."""
from __future__ import annotations

import json
import os
import sys

from .plot import plot_losses


class Logger:
    """Console + progress bar + metrics.jsonl + TensorBoard + a PNG of the loss curves, on rank 0 only."""

    def __init__(self, run_dir: str, active: bool, total: int, start: int):
        self.active, self.run_dir = active, run_dir
        if not active:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, disable=None)
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # tensorboard is an optional extra
            self.tb = None

    def log(self, rec: dict):
        if not self.active:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if "loss" not in rec:  # the step-0 evaluation
            self.bar.write(f"step {rec['step']:6d} | val_loss {rec['val_loss']:.4f} | val_ppl {rec['val_ppl']:.1f}")
            return
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, rec["step"])
        mfu = "n/a" if rec.get("mfu") is None else f"{100 * rec['mfu']:.2f}%"    # n/a: no known peak (CPU)
        line = (f"step {rec['step']:6d} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
                f"grad_norm {rec['grad_norm']:.3f} | scale {rec['loss_scale']:.0f} | "
                f"{rec['tokens_per_s']:.0f} tok/s | {rec['tflops_per_rank']:.3f} TFLOP/s/rank | "
                f"MFU {mfu} | mem {rec['memory_gb']:.2f} GB")
        spans = [f"{v:.0f}" for k, v in rec.items() if k.startswith("span/")]
        if spans:                                            # adaptive span: mean span per layer (tokens)
            line += " | span " + " ".join(spans)
        if "val_loss" in rec:
            line += f" | val_loss {rec['val_loss']:.4f} | val_ppl {rec['val_ppl']:.1f}"
        self.bar.write(line)
        self.bar.n = rec["step"]
        self.bar.refresh()

    def close(self):
        if not self.active:
            return
        self.bar.close()
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        try:
            plot_losses(os.path.join(self.run_dir, "metrics.jsonl"), os.path.join(self.run_dir, "loss.png"))
        except ImportError:  # matplotlib is the `plot` extra
            print("note: no loss.png: matplotlib is not installed (pip install 'megagpt[plot]')", file=sys.stderr)
