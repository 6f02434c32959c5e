"""The loop shared by DPO and the reward model: microbatches of whole preference pairs, a loss per pair.

train.micro_batch_size and global_batch_size count rows (two per pair). Pair p is rows 2p (chosen) and
2p+1 (rejected) of `rows` (align/prefs.py); DP replicas read disjoint pairs, and pairs cycle when the
data is smaller than the run. The step's loss is the sum of per-pair losses over the global batch
divided by its pair count, through the engine's `loss_fn` on the last stage, so each layout gives the
one-process loss and gradients. Subclasses give `make_rows` and `pair_loss`, and name their stats.
"""
from __future__ import annotations

import itertools

import torch

from ..data.sampler import MicroBatchSampler
from ..optim.lr import lr_at
from .base import AlignTrainer


class PairTrainer(AlignTrainer):
    stat_names: tuple = ()

    def __init__(self, cfg, run_dir: str, pairs, load: str | None = None, eval_pairs=None):
        t = cfg.train
        if t.micro_batch_size % 2 or t.global_batch_size % 2:
            raise ValueError("train.micro_batch_size and train.global_batch_size count rows and must be even "
                             "(a pair is two rows)")
        if not pairs:
            raise ValueError("preference pairs: none given")
        self.pairs, self.eval_pairs = pairs, eval_pairs or pairs
        super().__init__(cfg, run_dir, None, load)

    # ------------------------------------------------------------------ data
    def make_rows(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _build_data(self, data_path):
        self.needs_data = True
        self.train_data = self.make_rows(self.pairs)
        self.valid_data = self.make_rows(self.eval_pairs)

    def pair_ids(self, first_pair: int) -> list[list[int]]:
        """This replica's global pair indices of each microbatch, from first_pair on (they run past the data)."""
        sampler = MicroBatchSampler(1 << 62, first_pair, self.cfg.train.micro_batch_size // 2, self.ps.dp.rank, self.dp)
        return list(itertools.islice(sampler, self.num_microbatches))

    def pair_batches(self, rows, first_pair: int, pids: list[list[int]] | None = None) -> list[torch.Tensor]:
        """This replica's row ids [mbs] of each microbatch, from global pair first_pair on (cycling the data);
        pids: pair_ids(first_pair) when the caller has them already."""
        n = rows[0].shape[0] // 2
        return [torch.tensor([2 * (p % n) + k for p in pairs for k in (0, 1)])
                for pairs in (self.pair_ids(first_pair) if pids is None else pids)]

    def run_pairs(self, rows, first_pair: int, loss_scale: float, forward_only: bool = False,
                  limit: int | None = None) -> list[float]:
        """One pass of the engine over a global batch of pairs: [loss sum, *stat sums] over the global batch.
        limit: only pairs with global index < limit count (evaluation: a wrapped pair is not counted twice)."""
        pids = self.pair_ids(first_pair)
        ids = self.pair_batches(rows, first_pair, pids)
        dev = self.ps.device
        sums = torch.zeros(1 + len(self.stat_names), dtype=torch.float64)

        def get(i):
            return rows[0][ids[i]].to(dev), rows[1][ids[i]].to(dev)

        def loss_fn(i, out):
            losses, stats = self.pair_loss(i, out, ids[i])                   # [n] per pair
            keep = torch.tensor([limit is None or p < limit for p in pids[i]], device=losses.device)
            loss = torch.where(keep, losses, torch.zeros_like(losses)).sum().float()
            sums.add_(torch.tensor([float(loss.detach()), *(float((s.detach() * keep).sum()) for s in stats)],
                                   dtype=torch.float64))
            return loss

        kw = {} if forward_only else dict(before_last_backward=lambda: self.optimizer.set_sync(True))
        self.engine.forward_backward(get, self.num_microbatches, loss_scale, forward_only=forward_only,
                                     loss_fn=loss_fn, **kw)
        return self.last_stage_sum(sums.tolist())

    def pair_loss(self, i: int, out: torch.Tensor, row_ids: torch.Tensor):
        """-> (this microbatch's per-pair losses [n], [the per-pair stats in stat_names, each [n]])."""
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    def backward(self, first_pair: int) -> dict:
        """Forward and backward of one global batch; gradients left DP-reduced in the optimizer's buffer."""
        n = self.cfg.train.global_batch_size // 2
        self.optimizer.zero_grad()
        self.optimizer.set_sync(False)
        sums = self.run_pairs(self.train_data, first_pair, self.optimizer.loss_scale / n)
        return {"loss": sums[0] / n, **{k: v / n for k, v in zip(self.stat_names, sums[1:])}}

    def train_step(self) -> dict:
        t = self.cfg.train
        lr = lr_at(self.step, t)
        rec = self.backward(self.consumed_samples // 2)
        stats = self.optimizer.step(lr)
        self.consumed_samples += t.global_batch_size
        self.step += 1
        return {**rec, "lr": lr, **stats}

    @torch.no_grad()
    def evaluate_pairs(self, pairs_rows=None) -> dict:
        """Means over the held-out pairs, each counted once (one pass; the last partial batch wraps around
        to fill the engine's fixed shapes, and the wrapped pairs are left out of the sums)."""
        rows = self.valid_data if pairs_rows is None else pairs_rows
        n, per = rows[0].shape[0] // 2, self.cfg.train.global_batch_size // 2
        self.eval_mode(True)
        total = [0.0] * (1 + len(self.stat_names))
        for k in range(-(-n // per)):
            total = [a + b for a, b in zip(total, self.run_pairs(rows, k * per, 1.0, forward_only=True, limit=n))]
        self.eval_mode(False)
        return {"loss": total[0] / n, **{k: v / n for k, v in zip(self.stat_names, total[1:])}}

    def evaluate(self) -> float:
        return self.evaluate_pairs()["loss"]
