"""PPO (RLHF) on any layout: rollouts from the KV-cache generator, a programmatic (or reward-model) score,
a per-token KL penalty against the frozen reference, a value head, GAE, several epochs of the clipped
objective (align/ppo_math.py for the arithmetic).

The policy and the value head share the trunk (`PolicyValueModel`: the last stage returns the
per-token losses and the values stacked [2, b, s]; without labels it returns logits, so generation
is unchanged). Each step:
  1. rollout   this DP replica samples completions for its prompts (generate_ids, seeded per replica)
               and scores them: score_fn(prompt indices, completions) -> [b] (`checker_scores` wraps a
               per-answer checker; `RewardScorer` runs a trained reward model in the same layout)
  2. evaluate  old log-probs and values (the policy, forward only), reference log-probs (the reference
               weights swapped in for one forward pass), on the last stage
  3. GAE       rewards = score on the last token - kl_coef (logp - ref_logp); advantages whitened with
               the global mean and variance over the response tokens of all replicas
  4. update    ppo_epochs passes over the rollout batch, each one optimizer step on
               (policy loss + vf_coef value loss) summed over response tokens / their global count;
               each pass reports ratio_mean and ratio_max_dev (max |ratio - 1|): 1 and 0 on the first
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..model.gpt import GPTModel
from ..model.packing import IGNORE_INDEX
from ..optim.lr import lr_at
from ..parallel.layers import REPLICATED, make_param
from ..parallel.mappings import gather_to_full
from .base import AlignTrainer
from .ppo_math import gae, per_token_rewards, policy_loss, value_loss


def checker_scores(check):
    """check(prompt index, completion ids) -> float, as a batch score_fn."""
    return lambda idx, completions: [float(check(i, c)) for i, c in zip(idx, completions)]


class RewardScorer:
    """A trained reward model (a RewardTrainer built in the same layout, on the same ranks) as PPO's score:
    each completion is appended to its prompt and scored at its last token. The scores are right on the
    last pipeline stage, where PPO uses them (zeros elsewhere)."""

    def __init__(self, rm_trainer, prompts):
        self.rm, self.prompts = rm_trainer, prompts

    @torch.no_grad()
    def __call__(self, idx, completions):
        rm, s = self.rm, self.rm.cfg.train.seq_len
        tokens = torch.zeros(len(idx), s, dtype=torch.long)
        last = torch.zeros(len(idx), dtype=torch.long)
        for r, (i, comp) in enumerate(zip(idx, completions)):
            ids = (self.prompts[i] + comp)[:s]
            tokens[r, :len(ids)] = torch.tensor(ids)
            last[r] = len(ids) - 1
        mbs, dev, got = len(idx) // rm.num_microbatches, rm.ps.device, {}

        def loss_fn(i, rewards):
            got[i] = rewards.detach().cpu()
            return rewards.sum()
        rm.eval_mode(True)
        rm.engine.forward_backward(lambda i: (tokens[i * mbs:(i + 1) * mbs].to(dev), last[i * mbs:(i + 1) * mbs].to(dev)),
                                   rm.num_microbatches, 1.0, forward_only=True, loss_fn=loss_fn)
        rm.eval_mode(False)
        return torch.cat([got[i] for i in sorted(got)]) if got else torch.zeros(len(idx))


class PolicyValueModel(GPTModel):
    def __init__(self, cfg, ps=None, **kw):
        super().__init__(cfg, ps, **kw)
        if self.post_process:
            self.value_head = make_param((1, cfg.hidden_size), REPLICATED, self.tp.size, kw.get("device"),
                                         kw.get("dtype", torch.float32))

    def forward(self, x, labels=None, cache=None, packing=None):
        x = self.trunk(x, cache, packing)
        if not self.post_process:
            return x
        if labels is None:
            return self.head(x, None, cache)                                # logits: generation
        per_token = self.head(x, labels)                                    # [b, s]
        h = self.final_norm(x)
        if self.sp:
            h = gather_to_full(h, self.tp)                                   # [s, b, h]
        values = (h @ self.value_head.t()).squeeze(-1).float().t()          # [b, s]
        return torch.stack([per_token, values])                             # [2, b, s]


@dataclass
class PPOConfig:
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    ppo_epochs: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 48

    def validate(self):
        for name in ("clip", "value_clip", "temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"ppo.{name}: must be > 0, got {getattr(self, name)}")
        if self.kl_coef < 0 or self.ppo_epochs < 1 or not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ConfigError("ppo: need kl_coef >= 0, ppo_epochs >= 1, gamma and lam in [0, 1]")
        return self


class PPOTrainer(AlignTrainer):
    model_cls = PolicyValueModel
    no_dropout = "ppo"                          # align/base.py: the first pass must have ratio 1

    def __init__(self, cfg, run_dir, prompts, score_fn, ppo: PPOConfig | None = None, end_id: int = 0,
                 base: str | None = None, seed: int = 0):
        self.ppo, self.prompts, self.score_fn, self.end_id, self.seed = (ppo or PPOConfig()).validate(), prompts, score_fn, end_id, seed
        super().__init__(cfg, run_dir, None, None)
        if base:
            from .grow import load_grown
            load_grown(base, self.chunks, self.ps, cfg.model, new_params=("value_head",))
            self.reload_optimizer()
        self.ref_params = [{n: p.detach().clone() for n, p in c.named_parameters()} for c in self.chunks]

    def _build_data(self, data_path):
        self.needs_data, self.train_data, self.valid_data = True, None, None

    # ------------------------------------------------------------------ 1. rollout
    def my_prompts(self, step: int) -> list[int]:
        per = self.cfg.train.global_batch_size // self.dp
        first = (step * self.dp + self.ps.dp.rank) * per
        return [(first + k) % len(self.prompts) for k in range(per)]

    @torch.no_grad()
    def sample(self, step: int) -> list[list[int]]:
        from ..generate import generate_ids
        from ..sampling import Sampling
        self.eval_mode(True)
        s = Sampling(do_sample=True, temperature=self.ppo.temperature, seed=self.seed + step * self.dp + self.ps.dp.rank)
        out = generate_ids(self.chunks, [self.prompts[i] for i in self.my_prompts(step)], self.ppo.max_new_tokens, s,
                           ps=self.ps, eod_id=self.end_id)
        self.eval_mode(False)
        return out

    def rows(self, idx: list[int], completions: list[list[int]]):
        """-> tokens [b, s], labels [b, s] (the completion's tokens; IGNORE_INDEX elsewhere), mask [b, s]."""
        s = self.cfg.train.seq_len
        tokens = torch.zeros(len(idx), s, dtype=torch.long)
        labels = torch.full((len(idx), s), IGNORE_INDEX, dtype=torch.long)
        for r, (i, comp) in enumerate(zip(idx, completions)):
            ids = (self.prompts[i] + comp)[:s + 1]
            p = len(self.prompts[i])
            tokens[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            labels[r, p - 1:len(ids) - 1] = torch.tensor(ids[p:])
        return tokens, labels, labels != IGNORE_INDEX

    # ------------------------------------------------------------------ 2 and 3: old log-probs, values, advantages
    def _forward_all(self, tokens, labels) -> list | None:
        """Forward only over the replica's rows: [(per-token loss, values)] per microbatch on the last stage."""
        mbs, dev, got = self.cfg.train.micro_batch_size, self.ps.device, {}

        def loss_fn(i, out):
            got[i] = out.detach()
            return out[0].sum()
        self.engine.forward_backward(lambda i: (tokens[i * mbs:(i + 1) * mbs].to(dev), labels[i * mbs:(i + 1) * mbs].to(dev)),
                                     self.num_microbatches, 1.0, forward_only=True, loss_fn=loss_fn)
        return torch.cat([got[i] for i in range(self.num_microbatches)], dim=1) if got else None   # [2, b, s]

    @torch.no_grad()
    def prepare(self, idx, completions) -> dict:
        tokens, labels, mask = self.rows(idx, completions)
        scores = torch.as_tensor(self.score_fn(idx, completions), dtype=torch.float32).cpu()   # [b]
        self.eval_mode(True)
        old = self._forward_all(tokens, labels)
        live = [{n: p.detach().clone() for n, p in c.named_parameters()} for c in self.chunks]
        self._load(self.ref_params)
        ref = self._forward_all(tokens, labels)
        self._load(live)
        self.eval_mode(False)
        batch = {"tokens": tokens, "labels": labels, "mask": mask, "scores": scores}
        count = self.dp_sum([int(mask.sum())])[0]
        stats = [0.0, 0.0, 0.0, 0.0]
        if old is not None:
            logp, values, ref_logp = -old[0].cpu(), old[1].cpu(), -ref[0].cpu()
            rewards, kl = per_token_rewards(scores, logp, ref_logp, mask, self.ppo.kl_coef)
            adv, ret = gae(rewards.double(), values.double(), mask, self.ppo.gamma, self.ppo.lam)
            n, s1, s2 = self.dp_sum([float(mask.sum()), float(adv.sum()), float((adv ** 2).sum())])  # last-stage DP group
            mean = s1 / max(n, 1.0)
            var = max(s2 / max(n, 1.0) - mean ** 2, 0.0)
            adv = (adv - mean) / (var + 1e-8) ** 0.5 * mask
            batch.update(old_logp=logp, old_values=values, adv=adv.float(), returns=ret.float())
            stats = [float(kl.sum()), float(-(logp * mask).sum()), float(scores.sum()), float((scores > 0).sum())]
        else:                                   # keep the DP all-reduce in step on the other stages
            self.dp_sum([0.0, 0.0, 0.0])
        rows = self.cfg.train.global_batch_size
        kl, ent, score, acc = self.last_stage_sum(stats)
        batch["count"] = count
        batch["stats"] = {"kl": kl / rows, "entropy": ent / max(count, 1.0), "reward": score / rows, "accuracy": acc / rows}
        return batch

    def _load(self, params):
        with torch.no_grad():
            for c, saved in zip(self.chunks, params):
                for n, p in c.named_parameters():
                    p.copy_(saved[n])

    # ------------------------------------------------------------------ 4. the clipped objective
    def backward(self, batch) -> dict:
        """One pass over the rollout batch; gradients left DP-reduced in the optimizer's buffer."""
        mbs, dev, sums = self.cfg.train.micro_batch_size, self.ps.device, torch.zeros(5, dtype=torch.float64)
        worst = [0.0]                                                    # max |ratio - 1| on this rank
        self.optimizer.zero_grad()
        self.optimizer.set_sync(False)

        def part(key, i):
            return batch[key][i * mbs:(i + 1) * mbs].to(dev)

        def loss_fn(i, out):
            logp, values, mask = -out[0], out[1], part("mask", i)
            pl, clipped, ratio, dev = policy_loss(logp, part("old_logp", i), part("adv", i), mask, self.ppo.clip)
            vl = value_loss(values, part("old_values", i), part("returns", i), mask, self.ppo.value_clip)
            err = (((values - part("returns", i)) ** 2) * mask).sum()
            sums.add_(torch.tensor([float(pl.detach()), float(vl.detach()), float(clipped), float(err.detach()),
                                    float(ratio)], dtype=torch.float64))
            worst[0] = max(worst[0], float(dev))
            return pl + self.ppo.vf_coef * vl

        count = max(batch["count"], 1.0)
        self.engine.forward_backward(lambda i: (part("tokens", i), part("labels", i)), self.num_microbatches,
                                     self.optimizer.loss_scale / count, loss_fn=loss_fn,
                                     before_last_backward=lambda: self.optimizer.set_sync(True))
        pl, vl, clipped, err, ratio = self.last_stage_sum(sums.tolist())
        worst = torch.tensor(worst, dtype=torch.float64, device=dev)       # 0 off the last stage
        self.ps.world.all_reduce(worst, op=dist.ReduceOp.MAX)
        return {"loss": (pl + self.ppo.vf_coef * vl) / count, "policy_loss": pl / count, "value_loss": vl / count,
                "clip_frac": clipped / count, "value_error": err / count,
                "ratio_mean": ratio / count if batch["count"] else 1.0, "ratio_max_dev": float(worst[0])}

    def train_step(self) -> dict:
        idx = self.my_prompts(self.step)
        batch = self.prepare(idx, self.sample(self.step))
        lr = lr_at(self.step, self.cfg.train)
        for epoch in range(self.ppo.ppo_epochs):
            rec = self.backward(batch)
            first = rec if epoch == 0 else first
            stats = self.optimizer.step(lr)
        self.step += 1
        self.consumed_samples += self.cfg.train.global_batch_size
        # the last pass's losses; the first pass's max |ratio - 1| (0 unless old log-probs are stale)
        return {**rec, **batch["stats"], "lr": lr, **stats, "first_ratio_max_dev": first["ratio_max_dev"]}

    def evaluate(self) -> float:
        return 0.0
