"""Supervised fine-tuning: the pretraining loop on packed chat rows with a loss mask.

    python examples/finetune.py --config examples/configs/tiny.yaml --data data/chat --base runs/pretrained

Differences from pretraining (train.py), and nothing else:
  data      rows of packed conversations (align/sft_data.py): tokens, labels (IGNORE_INDEX off the
            assistant's tokens) and segment ids; every stage gets the microbatch's `Packing`
            (positions restart per sample, block-diagonal causal attention)
  loss      sum of the per-token losses / the global count of trainable labels in the step, over
            every microbatch and DP replica (one all-reduce of one number before the step): each
            layout gives the one-process loss and gradients; a sample without trainable tokens
            adds 0 to both sums, and a step without any gives loss 0, not NaN
  weights   `base` (a pretrained checkpoint) is loaded with the embedding grown to the chat
            tokenizer's vocab (align/grow.py), before the optimizer takes its copy
  val_loss  on `eval_data_path` (held-out conversations, preprocessed the same way) only; without it
            there is no validation (train.eval_interval is set to 0), never a training-set loss as val_loss
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

from ..data.sampler import MicroBatchSampler
from ..model.packing import packing_of
from .base import AlignTrainer
from .sft_data import SFTDataset, SFTRows, make_rows_batch


class SFTTrainer(AlignTrainer):
    def __init__(self, cfg, run_dir: str, data_path: str | None, load: str | None = None, base: str | None = None,
                 packed: bool = True, eval_data_path: str | None = None):
        if not data_path:
            raise ValueError("sft: --data PREFIX (conversations preprocessed by tools/preprocess_chat.py) is required")
        self.packed, self.eval_data_path = packed, eval_data_path
        cfg, no_val = self.without_validation(cfg, eval_data_path)
        super().__init__(cfg, run_dir, data_path, load)
        self.say_no_validation(no_val)
        if base and not load:
            from .grow import load_grown
            load_grown(base, self.chunks, self.ps, cfg.model)
            self.reload_optimizer()

    stage, held_out_flag = "sft", "--eval-data PREFIX"        # named in the one-line notes below

    @staticmethod
    def without_validation(cfg, held_out):
        """(cfg, True) with train.eval_interval set to 0 when there is no held-out data: a training-set loss
        is never logged as val_loss; else (cfg, False)."""
        if held_out or not cfg.train.eval_interval:
            return cfg, False
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, eval_interval=0)), True

    def say_no_validation(self, no_val: bool) -> None:
        if no_val and self.is_logger:
            print(f"{self.stage}: no held-out data ({self.held_out_flag}): no validation "
                  f"(train.eval_interval set to 0)", flush=True)

    def _build_data(self, data_path):
        self.needs_data = True
        self.train_data, self.valid_data = (self._rows(p) if p else None for p in (data_path, self.eval_data_path))

    def _rows(self, path: str) -> SFTRows:
        data = SFTDataset(path)
        if data.vocab_size > self.cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size: {self.cfg.model.vocab_size} is smaller than the vocab {data.vocab_size} "
                             f"of the tokenizer that made {path}")
        return SFTRows(data, self.cfg.train.seq_len, self.packed)

    def _microbatch_fn(self, dataset, first_sample: int):
        """(get(i) -> (tokens, labels) of microbatch i, kwargs(i) -> {"packing"}, this replica's trainable count)."""
        t = self.cfg.train
        sampler = MicroBatchSampler(1 << 62, first_sample, t.micro_batch_size, self.ps.dp.rank, self.dp)
        mbs = [make_rows_batch(dataset, idx) for idx in itertools.islice(sampler, self.num_microbatches)]
        dev = self.ps.device
        count = sum(int((labels >= 0).sum()) for _, labels, _ in mbs)
        packs = [packing_of(seg).to(dev) for _, _, seg in mbs]
        return (lambda i: (mbs[i][0].to(dev), mbs[i][1].to(dev))), (lambda i: {"packing": packs[i]}), count

    def backward(self, first_sample: int) -> tuple[float, float]:
        """Forward and backward of the global batch at first_sample: (mean loss over trainable labels,
        their count). Gradients are left DP-reduced in the optimizer's buffer."""
        get, kwargs, local = self._microbatch_fn(self.train_data, first_sample)
        count = self.dp_sum([local])[0]
        self.optimizer.zero_grad()
        self.optimizer.set_sync(False)
        per_mb = self.engine.forward_backward(get, self.num_microbatches, self.optimizer.loss_scale / max(count, 1.0),
                                              before_last_backward=lambda: self.optimizer.set_sync(True),
                                              model_kwargs=kwargs)
        return self.last_stage_sum([sum(float(x) for x in per_mb)])[0] / max(count, 1.0), count

    def train_step(self) -> dict:
        from ..optim.lr import lr_at
        t = self.cfg.train
        lr = lr_at(self.step, t)
        loss, count = self.backward(self.consumed_samples)
        stats = self.optimizer.step(lr)
        self.consumed_samples += t.global_batch_size
        self.step += 1
        return {"loss": loss, "trainable_tokens": count, "lr": lr, **stats}

    @torch.no_grad()
    def _eval_batch(self, k: int) -> tuple[float, float]:
        """(loss sum, trainable count) of validation batch k."""
        get, kwargs, local = self._microbatch_fn(self.valid_data, k * self.cfg.train.global_batch_size)
        per_mb = self.engine.forward_backward(get, self.num_microbatches, 1.0, forward_only=True, model_kwargs=kwargs)
        return self.last_stage_sum([sum(float(x) for x in per_mb)])[0], self.dp_sum([local])[0]

    def evaluate(self) -> float:
        """Mean loss over the trainable labels of eval_iters batches of the held-out conversations (the rows
        cycle: SFT data is small)."""
        if self.valid_data is None:
            raise ValueError(f"{self.stage}: no held-out data to evaluate ({self.held_out_flag})")
        self.eval_mode(True)
        sums = [self._eval_batch(k) for k in range(self.cfg.train.eval_iters)]
        self.eval_mode(False)
        return sum(x for x, _ in sums) / max(sum(n for _, n in sums), 1.0)
