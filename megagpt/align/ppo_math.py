"""PPO's arithmetic on per-token tensors [b, t] with a mask of the response tokens (plain functions, tested by hand).

  kl_t        = logp_t - ref_logp_t                  (the sampled token's log-ratio: an unbiased KL estimate)
  reward_t    = -kl_coef kl_t, plus the sequence's score on its last response token
  GAE         delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1}, V after the last = 0
  returns     = A + V; advantages whitened over the response tokens of the batch
  policy      max(-A ratio, -A clip(ratio, 1-eps, 1+eps)), ratio = exp(logp - old_logp)
  value       0.5 max((V - R)^2, (old_V + clip(V - old_V, -eps_v, eps_v) - R)^2)
Masked positions carry nothing; means are over response tokens (caller's count, so a layout can use the global one).
"""
from __future__ import annotations

import torch


def per_token_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """score [b], logp/ref_logp/mask [b, t] -> (rewards [b, t], kl [b, t]); the score lands on each row's last response token."""
    m = mask.to(logp.dtype)
    kl = (logp - ref_logp) * m
    rewards = -kl_coef * kl
    last = (mask.long().cumsum(1) == mask.long().sum(1, keepdim=True)) & mask.bool()   # the last masked position
    return rewards + last.to(rewards.dtype) * score[:, None].to(rewards.dtype), kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """-> (advantages [b, t], returns [b, t]); only masked positions are steps of the episode."""
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    next_v = torch.zeros_like(values[:, 0])
    next_a = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_a
        adv[:, t] = a * m[:, t]
        next_v = torch.where(m[:, t] > 0, values[:, t], next_v)       # a masked gap is skipped, not a step
        next_a = torch.where(m[:, t] > 0, a, next_a)
    return adv, (adv + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def policy_loss(logp, old_logp, adv, mask, clip: float):
    """-> (summed clipped-surrogate loss over the response tokens, summed clipped indicator, summed ratio,
    max |ratio - 1| over the response tokens: 0 on the first pass, when the policy is the one that sampled)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).to(logp.dtype)
    dev = ((ratio - 1).abs() * m).max() if m.numel() else ratio.new_zeros(())
    return (loss * m).sum(), (clipped * m).sum().detach(), (ratio * m).sum().detach(), dev.detach()


def value_loss(values, old_values, returns, mask, clip: float):
    """-> summed clipped value loss over the response tokens."""
    m = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return (0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2) * m).sum()
