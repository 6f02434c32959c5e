"""DPO: the policy trained on preference pairs against a frozen reference (align/losses.py for the formulas).

The reference's summed completion log-probabilities are computed once, before training, by the same
engine in the same layout (forward only): from the policy's starting weights, or from `reference`, a
checkpoint that must be of this model (one-line error otherwise). Each DP replica computes the rows it
is given and the table is summed over DP, so the last stage of every replica holds all of it.
A row's log-probability is minus the sum of its per-token losses (labels only on the answer).
Logged: loss, implicit rewards beta (pi - ref) of the chosen and rejected answers, their margin and
the fraction of pairs where it is positive.
nll_weight > 0 adds nll_weight x the chosen answer's mean per-token negative log-likelihood to each
pair's loss (DPO+NLL, as Pang et al. 2024 "Iterative Reasoning Preference Optimization" and TRL's
rpo_alpha): on reasoning chains, DPO alone lowers the chosen answers' likelihood along with the
rejected ones'. It is a per-pair term, so the layouts stay equal to one process; 0 (default) is DPO.
"""
from __future__ import annotations

import torch

from ..model.packing import IGNORE_INDEX
from .losses import check_dpo_args, dpo_loss
from .pairs import PairTrainer
from .prefs import dpo_rows


class DPOTrainer(PairTrainer):
    no_dropout = "dpo"                          # align/base.py: the policy and reference log-probs must agree
    stat_names = ("reward_chosen", "reward_rejected", "margin", "reward_accuracy")

    def __init__(self, cfg, run_dir, pairs, load=None, eval_pairs=None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, base: str | None = None, reference: str | None = None,
                 nll_weight: float = 0.0):
        check_dpo_args(beta, loss_type, label_smoothing)               # before any work
        if not nll_weight >= 0:
            raise ValueError(f"dpo.nll_weight: must be >= 0, got {nll_weight}")
        self.beta, self.loss_type, self.label_smoothing, self.nll_weight = beta, loss_type, label_smoothing, nll_weight
        self.ref = None
        super().__init__(cfg, run_dir, pairs, load, eval_pairs)
        if base and not load:
            from .grow import load_grown
            load_grown(base, self.chunks, self.ps, cfg.model)
            self.reload_optimizer()
        self.ref, self.ref_valid = self.reference_logps(reference)

    def make_rows(self, pairs):
        return dpo_rows(pairs, self.cfg.train.seq_len)

    @torch.no_grad()
    def row_logps(self, rows) -> torch.Tensor:
        """Summed answer log-probabilities [2n] of every row under the current weights (on every rank)."""
        n, per = rows[0].shape[0] // 2, self.cfg.train.global_batch_size // 2
        table = torch.zeros(2, rows[0].shape[0], dtype=torch.float64)        # sums, counts
        self.eval_mode(True)
        for k in range(-(-n // per)):
            ids = self.pair_batches(rows, k * per)
            dev = self.ps.device

            def loss_fn(i, per_token, ids=ids):
                table[0].index_add_(0, ids[i], (-per_token.sum(1)).double().cpu())
                table[1].index_add_(0, ids[i], torch.ones(len(ids[i]), dtype=torch.float64))
                return per_token.sum()

            self.engine.forward_backward(lambda i, ids=ids: (rows[0][ids[i]].to(dev), rows[1][ids[i]].to(dev)),
                                         self.num_microbatches, 1.0, forward_only=True, loss_fn=loss_fn)
        self.eval_mode(False)
        if not (self.ps.is_last_stage and self.ps.tp.rank == 0):
            table.zero_()
        flat = table.to(self.ps.device)
        self.ps.world.all_reduce(flat)                                       # every stage, every replica
        return (flat[0] / flat[1].clamp(min=1)).cpu()

    def reference_logps(self, reference: str | None):
        if reference is None:
            return self.row_logps(self.train_data), self.row_logps(self.valid_data)
        from ..checkpoint.sharded import load_checkpoint
        saved = [{n: p.detach().clone() for n, p in c.named_parameters()} for c in self.chunks]
        load_checkpoint(reference, self.chunks, self.ps, self.cfg)           # checks it is this model
        out = self.row_logps(self.train_data), self.row_logps(self.valid_data)
        with torch.no_grad():
            for c, s in zip(self.chunks, saved):
                for n, p in c.named_parameters():
                    p.copy_(s[n])
        return out

    def run_pairs(self, rows, *args, **kw):
        self.ref_now = self.ref if rows is self.train_data else self.ref_valid     # this pass's reference table
        self.rows_now = rows
        return super().run_pairs(rows, *args, **kw)

    def pair_loss(self, i, per_token, row_ids):
        ref = self.ref_now[row_ids].to(per_token.device)
        logp = -per_token.sum(1).double()                                     # [2n]
        losses, rc, rr = dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], self.beta, self.loss_type,
                                  self.label_smoothing)
        margin = rc - rr
        if self.nll_weight:
            n_tok = (self.rows_now[1][row_ids[0::2]] != IGNORE_INDEX).sum(1).to(logp.device)   # [n] chosen lengths
            losses = losses - self.nll_weight * logp[0::2] / n_tok.clamp(min=1)
        return losses, [rc, rr, margin, (margin > 0).double()]
