"""The reward model: the GPT trunk with a scalar head read at each row's last real token.

The head is one replicated [1, h] weight on the final norm's output. Under sequence parallelism the
output is gathered whole first (`gather_to_full`: its backward takes this rank's slice, so the
replicated head gets the full gradient on every TP rank, not a TP-partial one). The last stage is
given, as its "labels", the index of each row's last real token ([b]; align/prefs.py reward_rows),
so a reward is never read from padding. There is no LM head: tied embeddings are refused.
Pairwise loss -log s(r_c - r_r - margin); evaluation reports the accuracy r_c > r_r on held-out pairs.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..model.gpt import GPTModel
from ..parallel.layers import REPLICATED, make_param
from ..parallel.mappings import gather_to_full
from .losses import reward_pair_loss
from .pairs import PairTrainer
from .prefs import reward_rows


class RewardModel(GPTModel):
    def __init__(self, cfg, ps=None, **kw):
        if cfg.tie_embeddings:
            raise ConfigError("model.tie_embeddings: the reward model has no LM head to tie; set it to false")
        super().__init__(cfg, ps, **kw)
        if self.post_process:
            del self.lm_head
            self.reward_head = make_param((1, cfg.hidden_size), REPLICATED, self.tp.size, kw.get("device"),
                                          kw.get("dtype", torch.float32))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, cache=None, packing=None) -> torch.Tensor:
        """Last stage: labels = last [b] -> rewards [b] (fp32); labels None -> every position's value [b, s]."""
        x = self.trunk(x, cache, packing)
        if not self.post_process:
            return x
        x = self.final_norm(x)
        if self.sp:
            x = gather_to_full(x, self.tp)                                   # [s, b, h]
        values = (x @ self.reward_head.t()).squeeze(-1).float().t()         # [b, s]
        if labels is None:
            return values
        return values.gather(1, labels.long()[:, None]).squeeze(1)          # [b]


class RewardTrainer(PairTrainer):
    model_cls = RewardModel
    stat_names = ("accuracy", "reward_chosen", "reward_rejected", "margin")

    def __init__(self, cfg, run_dir, pairs, load=None, eval_pairs=None, margin: float = 0.0, base: str | None = None):
        self.margin = margin
        super().__init__(cfg, run_dir, pairs, load, eval_pairs)
        if base and not load:
            from .grow import load_grown
            load_grown(base, self.chunks, self.ps, cfg.model, new_params=("reward_head",))
            self.reload_optimizer()

    def make_rows(self, pairs):
        return reward_rows(pairs, self.cfg.train.seq_len)

    def pair_loss(self, i, rewards, row_ids):
        r_c, r_r = rewards[0::2], rewards[1::2]                              # [n] each
        d = (r_c - r_r).detach()
        return reward_pair_loss(r_c, r_r, self.margin), [(d > 0).double(), r_c.detach(), r_r.detach(), d]
