"""PPO arithmetic: GAE against a hand-computed example, the KL penalty's placement, KL 0 when the policy equals
the reference, the ratio statistics (sum, max |ratio - 1|) against known ratios, clipping against its formula,
no NaN on empty masks."""
import torch

from megagpt.align.ppo_math import gae, per_token_rewards, policy_loss, value_loss, whiten


def test_gae_by_hand():
    # one row, 3 response tokens after a 1-token prompt (mask 0 first), gamma 0.9, lambda 0.8
    r = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    v = torch.tensor([[9.0, 0.5, 1.0, 1.5]])
    m = torch.tensor([[0, 1, 1, 1]])
    adv, ret = gae(r, v, m, 0.9, 0.8)
    d3 = 2.0 + 0.9 * 0 - 1.5                       # 0.5
    d2 = 0.0 + 0.9 * 1.5 - 1.0                     # 0.35
    d1 = 1.0 + 0.9 * 1.0 - 0.5                     # 1.4
    a3 = d3
    a2 = d2 + 0.72 * a3
    a1 = d1 + 0.72 * a2
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 1.0, a3 + 1.5]]))


def test_rewards_kl_and_first_minibatch():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(2, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    rewards, kl = per_token_rewards(torch.tensor([1.0, -1.0]), logp, logp.clone(), mask, 0.1)
    assert float(kl.abs().sum()) == 0.0                                       # policy = reference: KL 0
    torch.testing.assert_close(rewards, torch.tensor([[0, 0, 0, 1.0, 0], [0, 0, 0, 0, -1.0]]))
    ref = logp - 0.3
    rewards, kl = per_token_rewards(torch.tensor([1.0, -1.0]), logp, ref, mask, 0.1)
    torch.testing.assert_close(kl, 0.3 * mask.float())
    torch.testing.assert_close(rewards, -0.03 * mask.float() + torch.tensor([[0, 0, 0, 1.0, 0], [0, 0, 0, 0, -1.0]]))
    adv = whiten(torch.randn(2, 5, generator=g), mask)
    # the ratio statistics measure the ratio (the engine's first-pass ratio 1 is tests/test_ppo.py's):
    # a policy 5% likelier on every token, and one with a single token 30% less likely
    loss, clipped, ratio_sum, dev = policy_loss(logp + torch.log(torch.tensor(1.05)), logp, adv, mask, 0.2)
    assert float(clipped) == 0.0
    torch.testing.assert_close(float(ratio_sum), 1.05 * float(mask.sum()))
    torch.testing.assert_close(float(dev), 0.05)
    torch.testing.assert_close(loss, -1.05 * (adv * mask).sum())
    off = torch.zeros(2, 5)
    off[1, 3], off[0, 0] = torch.log(torch.tensor(0.7)), 5.0                  # [0, 0] is masked: not counted
    loss, clipped, ratio_sum, dev = policy_loss(logp + off, logp, adv, mask, 0.2)
    assert float(clipped) == 1.0
    torch.testing.assert_close(float(ratio_sum), float(mask.sum()) - 0.3)
    torch.testing.assert_close(float(dev), 0.3)


def test_clipping_formulas():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    mask = torch.ones(1, 4)
    loss, clipped, _, dev = policy_loss(logp, old, adv, mask, 0.2)
    # A>0: min(r, clip(r)) -> 1.2 and 0.5; A<0: max(r, clip(r)) -> 1.5 and 0.8; loss = -sum of A * that
    torch.testing.assert_close(loss, torch.tensor(-(1.2 + 0.5) + (1.5 + 0.8)))
    assert float(clipped) == 4.0
    torch.testing.assert_close(float(dev), 0.5)
    v, ov, ret = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 3.0]])
    # token 0: max((2-0)^2, (1.2-0)^2) = 4; token 1: max((0-3)^2, (0.8-3)^2) = 9
    torch.testing.assert_close(value_loss(v, ov, ret, torch.ones(1, 2), 0.2), torch.tensor(0.5 * (4 + 9)))


def test_empty_mask_no_nan():
    z = torch.zeros(2, 3)
    m = torch.zeros(2, 3)
    adv, ret = gae(z, z, m, 1.0, 1.0)
    w = whiten(torch.randn(2, 3), m)
    assert torch.isfinite(w).all() and float(w.abs().sum()) == 0 and float(adv.abs().sum()) == 0
    assert float(policy_loss(z, z, w, m, 0.2)[0]) == 0.0
