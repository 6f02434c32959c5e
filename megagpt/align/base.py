"""What the post-training loops add to the pretraining Trainer: sums over the ranks that hold them.

The loss of a step is a sum over trainable units (tokens for SFT, pairs for DPO and the reward model)
divided by the global count of those units. The count is known before the step (from the data) and
summed over DP, so every rank scales its backward by the same 1/count; the loss sums live on the
last pipeline stage (TP rank 0 of each DP replica counts) and are summed over the world for the log.

DPO and PPO (`no_dropout` names the stage) run with dropout off: they compare log-probabilities of the same
weights taken in eval mode (the reference's, the rollout policy's) with ones taken in training mode (the
update), so dropout would break their invariants (DPO loss ln 2 at initialisation, PPO's first-pass ratio 1).
As in TRL (disable_dropout=True by default), model.hidden_dropout and model.attention_dropout are set to 0
for the stage, with a one-line note; the stage's checkpoints record 0. SFT and the reward model keep them.
"""
from __future__ import annotations

import dataclasses

import torch

from ..train import Trainer


class AlignTrainer(Trainer):
    no_dropout: str | None = None

    def __init__(self, cfg, run_dir: str, data_path: str | None = None, load: str | None = None):
        m = cfg.model
        off = bool(self.no_dropout and (m.hidden_dropout or m.attention_dropout))
        if off:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, hidden_dropout=0.0, attention_dropout=0.0))
        super().__init__(cfg, run_dir, data_path, load)
        if off and self.is_logger:
            print(f"{self.no_dropout}: runs with dropout off (model.hidden_dropout={m.hidden_dropout} and "
                  f"model.attention_dropout={m.attention_dropout} set to 0, as TRL does)", flush=True)

    def dp_sum(self, values) -> list[float]:
        """Each DP replica's numbers summed over DP (every rank calls it)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.ps.device)
        self.ps.dp.all_reduce(t)
        return t.tolist()

    def last_stage_sum(self, values) -> list[float]:
        """Numbers held by the last stage's TP rank 0 of each replica, summed over them (every rank calls it);
        other ranks pass anything of the same length."""
        t = torch.zeros(len(values), dtype=torch.float64, device=self.ps.device)
        if self.ps.is_last_stage and self.ps.tp.rank == 0:
            t += torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.ps.device)
        self.ps.world.all_reduce(t)
        return t.tolist()

    def eval_mode(self, on: bool) -> None:
        if on:
            self.optimizer.finish_param_sync()
        for c in self.chunks:
            c.train(not on)

    def reload_optimizer(self) -> None:
        """Rebuild the optimizer after weights were loaded in place (its fp32 main copy starts from them)."""
        from ..optim.optimizer import build_optimizer
        self.optimizer.buffer.remove_hooks()
        for h in getattr(self.optimizer, "_hooks", []):
            h.remove()
        self.optimizer = build_optimizer(self.chunks, self.ps, self.cfg.train, self.cfg.parallel, self.cfg.model)
