"""Mixture of experts in one process: the layer equals a naive per-token loop (forward, aux losses,
every gradient, in fp64 to 1e-10), capacity drops follow the lowest-probability rule, the dispatcher
is invertible, and bad configs fail in one line."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megagpt.config import ConfigError, load_config
from megagpt.model.gpt import build_model
from megagpt.model.moe import MoE, MoEContext, capacity_keep
from megagpt.parallel.state import Group, ParallelState
from megagpt.parallel.token_dispatch import combine, dispatch, dispatch_plan

from dist import spawn, tiny_model_cfg

ONE = Group("x", [0], 0)


def moe_cfg(**over):
    base = dict(moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=24, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    base.update(over)
    return tiny_model_cfg(**base)


def make_moe(cfg, seed=0, dtype=torch.float64):
    ctx = MoEContext()
    moe = MoE(cfg, 0, ONE, ONE, False, ctx, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
        if moe.selection_bias is not None:   # a bias large enough to change the choice
            moe.selection_bias.copy_(torch.randn(moe.selection_bias.shape, generator=g))
    return moe, ctx


def naive(moe, x):
    """Per token: route, run the chosen experts one by one; returns (y, balancing loss, z-loss)."""
    cfg, E, k = moe.cfg, moe.cfg.moe_num_experts, moe.cfg.moe_top_k
    s, b, h = x.shape
    toks = x.reshape(-1, h)
    T = toks.shape[0]
    logits = toks @ moe.router.weight.t()
    scores = logits.softmax(-1) if cfg.moe_router_score == "softmax" else logits.sigmoid()
    if moe.selection_bias is not None:   # chosen by the biased scores, weighted by the plain ones
        e = (scores + moe.selection_bias).topk(k, dim=-1).indices
        w = scores.gather(-1, e)
    else:
        w, e = scores.topk(k, dim=-1)
    if cfg.moe_router_norm_topk:
        w = w / w.sum(-1, keepdim=True)
    keep = [[True] * k for _ in range(T)]
    if cfg.moe_capacity_factor is not None:       # per expert, highest weight first, earlier selection on ties
        cap = math.ceil(cfg.moe_capacity_factor * T * k / E)
        for ex in range(E):
            sel = [(-w[t, j].item(), t * k + j) for t in range(T) for j in range(k) if e[t, j] == ex]
            for _, flat in sorted(sel)[cap:]:
                keep[flat // k][flat % k] = False
    rows = []
    for t in range(T):
        y = torch.zeros(h, dtype=x.dtype)
        for j in range(k):
            if keep[t][j]:
                W1, W2 = moe.experts.fc1.weight[e[t, j]], moe.experts.fc2.weight[e[t, j]]
                gate, up = (W1 @ toks[t]).chunk(2)
                y = y + w[t, j] * (W2 @ (F.silu(gate) * up))
        if moe.shared is not None:
            gs, us = (moe.shared.fc1.weight @ toks[t]).chunk(2)
            y = y + moe.shared.fc2.weight @ (F.silu(gs) * us)
        rows.append(y)
    balance = scores if cfg.moe_router_score == "softmax" else scores / scores.sum(-1, keepdim=True)
    frac = F.one_hot(e, E).sum(1).sum(0).to(x.dtype) / (T * k)      # f_e: share of the selections
    lb = E * (frac * balance.mean(0)).sum()                            # Switch: E * sum_e f_e P_e
    z = torch.logsumexp(logits, -1).square().mean()
    return torch.stack(rows).view(s, b, h), lb, z


CASES = [dict(), dict(moe_router_score="sigmoid", moe_router_norm_topk=True), dict(moe_shared_expert_size=16),
         dict(moe_router_bias_rate=0.01, moe_router_score="sigmoid"),
         dict(moe_capacity_factor=0.75), dict(moe_top_k=1, moe_capacity_factor=1.0), dict(moe_num_experts=40, moe_top_k=3)]


@pytest.mark.parametrize("over", CASES, ids=lambda o: ",".join(f"{k[4:]}={v}" for k, v in o.items()) or "default")
def test_moe_equals_naive_loop_forward_aux_and_grads(over):
    cfg = moe_cfg(**over)
    moe, ctx = make_moe(cfg)
    x = torch.randn(5, 2, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # ours: aux losses attached to the output (scale 1), backward from the output only
    xa = x.clone().requires_grad_()
    y = moe(xa)
    (y * r).sum().backward()
    (_, lb, z), = ctx.aux
    ours = {n: p.grad.clone() for n, p in moe.named_parameters()} | {"x": xa.grad}
    # naive: the objective written out, aux losses added as scalars
    moe.zero_grad()
    xb = x.clone().requires_grad_()
    y_ref, lb_ref, z_ref = naive(moe, xb)
    ((y_ref * r).sum() + cfg.moe_aux_loss_coeff * lb_ref + cfg.moe_z_loss_coeff * z_ref).backward()
    ref = {n: p.grad.clone() for n, p in moe.named_parameters()} | {"x": xb.grad}
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lb, lb_ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z, z_ref.detach(), rtol=1e-10, atol=1e-12)
    for n in ref:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")
    if cfg.moe_capacity_factor is not None:   # the case drops something, so the rule is exercised
        w, e = moe.router.weight.detach(), None
        logits = x.reshape(-1, cfg.hidden_size) @ w.t()
        sc = logits.softmax(-1) if cfg.moe_router_score == "softmax" else logits.sigmoid()
        wt, e = sc.topk(cfg.moe_top_k, -1)
        assert not capacity_keep(wt, e, cfg.moe_num_experts, cfg.moe_capacity_factor).all()


def test_balanced_router_gives_the_coefficient():
    """Uniform probabilities and equal counts: the balancing loss is exactly 1 (times its coefficient)."""
    cfg = moe_cfg(moe_num_experts=4, moe_top_k=2)
    moe, ctx = make_moe(cfg)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(8, 1, cfg.hidden_size, dtype=torch.float64))
    # zero logits: P_e = 1/4 for every expert, and the f_e sum to 1 whichever experts topk picks
    (_, lb, z), = ctx.aux
    assert lb.item() == pytest.approx(1.0)
    assert z.item() == pytest.approx(math.log(4) ** 2)


def test_capacity_ties_keep_the_earlier_selection():
    w = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]])
    e = torch.tensor([[0, 1], [0, 1], [0, 1]])
    keep = capacity_keep(w, e, 2, 2 / 3)              # C = ceil(2/3 * 3 * 2 / 2) = 2 per expert
    # expert 0: 0.9 (token 2), then the tie 0.5 of tokens 0 and 1 goes to token 0; expert 1: tokens 0, 1
    assert keep.tolist() == [[True, True], [False, True], [True, False]]


@pytest.mark.parametrize("experts", [4, 64])
def test_permute_unpermute_with_weights_one_over_k_is_the_identity(experts):
    """Megatron's dispatcher test: with probabilities 1/k, dispatch -> combine returns the input, and
    its gradient returns the gradient (64 experts: more experts than tokens, many get none)."""
    k, n, h = 2, 6, 5
    x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    expert_of = torch.stack([torch.randperm(experts)[:k] for _ in range(n)]).reshape(-1)
    token_of = torch.arange(n).repeat_interleave(k)
    plan = dispatch_plan(expert_of, experts, ONE)
    rows, counts = dispatch(x[token_of], plan)
    assert sum(counts) == n * k and len(counts) == experts
    out = combine(rows, torch.full((n * k,), 1.0 / k, dtype=torch.float64), token_of, n, plan)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-15)
    g = torch.randn(n, h, dtype=torch.float64)
    out.backward(g)
    torch.testing.assert_close(x.grad, g, rtol=0, atol=1e-15)


def _dispatch_worker(rank, world, experts):
    """Each ep rank routes its own tokens; the local experts scale their rows by (global expert + 1)."""
    ep = ParallelState.create(ep=world).ep
    k, n, h = 2, 6, 5
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    expert_of = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n)]).reshape(-1)
    token_of = torch.arange(n).repeat_interleave(k)
    plan = dispatch_plan(expert_of, experts, ep)
    rows, counts = dispatch(x[token_of], plan)
    local = experts // ep.size
    scale = torch.cat([torch.full((c,), float(ep.rank * local + i + 1), dtype=torch.float64)
                       for i, c in enumerate(counts)]) if counts else torch.zeros(0, dtype=torch.float64)
    weight = torch.full((n * k,), 1.0 / k, dtype=torch.float64)
    identity = combine(rows, weight, token_of, n, plan)
    scaled = combine(rows * scale[:, None], weight, token_of, n, plan)
    grad_out = torch.randn(n, h, dtype=torch.float64, generator=g)
    x_grad = torch.autograd.grad(identity, x, grad_out, retain_graph=True)[0]
    factor = (expert_of.view(n, k).double() + 1).mean(-1, keepdim=True)              # [n, 1]
    return dict(x=x.detach(), out=identity.detach(), grad_out=grad_out, x_grad=x_grad, scaled=scaled.detach(),
                want_scaled=(x * factor).detach(), received=sum(counts), sent=plan.send)


@pytest.mark.parametrize("experts", [4, 64])
def test_permute_unpermute_is_the_identity_at_ep2(experts):
    """The same over two forked ep ranks (the all-to-all with variable splits; 64 experts: most get no
    row): dispatch -> combine with weights 1/k returns the input and its gradient the gradient, and the
    rows reach the right experts (each expert scaling its rows by its id + 1 gives x * mean(id + 1))."""
    ranks = spawn(2, _dispatch_worker, experts, timeout=120)
    assert sum(r["received"] for r in ranks) == 2 * 6 * 2 and all(0 < r["sent"][1] for r in ranks)
    for r in ranks:
        torch.testing.assert_close(r["out"], r["x"], rtol=0, atol=1e-15)
        torch.testing.assert_close(r["x_grad"], r["grad_out"], rtol=0, atol=1e-15)
        torch.testing.assert_close(r["scaled"], r["want_scaled"], rtol=1e-14, atol=1e-14)


def test_moe_model_trains_in_one_process_and_every_expert_param_gets_a_grad():
    cfg = moe_cfg(num_layers=3, moe_layers=[0, 2], moe_shared_expert_size=16)
    model = build_model(cfg, ParallelState.single())
    assert type(model.layers["1"].mlp).__name__ == "MLP" and isinstance(model.layers["2"].mlp, MoE)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    model(tokens, tokens).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert [a[0] for a in model.moe.aux] == [0, 2] and int(model.moe.load[0].sum()) == 2 * 16 * 2


@pytest.mark.parametrize("override, message", [
    ("model.moe_top_k=5", "model.moe_top_k: expected 1 <= top-k <= model.moe_num_experts=4"),
    ("model.moe_capacity_factor=0", "model.moe_capacity_factor: expected a finite number > 0"),
    ("model.moe_capacity_factor=-0.5", "model.moe_capacity_factor: expected a finite number > 0"),
    ("model.moe_capacity_factor=inf", "model.moe_capacity_factor: expected a finite number > 0"),
    ("model.moe_capacity_factor=.inf", "model.moe_capacity_factor: expected a finite number > 0"),
    ("model.moe_capacity_factor=nan", "model.moe_capacity_factor: expected a finite number > 0"),
    ("model.moe_layers=[0,9]", "model.moe_layers: layer ids must lie in [0, model.num_layers=2)"),
    ("model.mod_layers=[2]", "model.mod_layers: layer ids must lie in [0, model.num_layers=2)"),
    ("parallel.ep=3", "parallel.ep: 3 does not divide model.moe_num_experts=4"),
    ("parallel.ep=4", "parallel.ep: 4 does not divide dp=6 (world 6 / tp*cp*pp=1)"),
])
def test_bad_moe_config_is_one_line(override, message):
    base = ["model.num_layers=2", "model.moe_num_experts=4", "model.hidden_size=64", "model.num_heads=4",
            "model.ffn_hidden_size=64", "model.vocab_size=128", "train.seq_len=16", "model.max_seq_len=16",
            "train.global_batch_size=12"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + [override], world_size=6)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_router_runs_in_fp32_in_a_bf16_model(monkeypatch):
    """bf16 weights and activations: the router's logits are fp32, and the experts chosen are those of
    fp32 routing of the upcast input and router weight (the expert computation itself stays bf16)."""
    import megagpt.model.moe as moe_module
    cfg = moe_cfg(moe_num_experts=8, moe_top_k=2)
    moe, _ = make_moe(cfg, dtype=torch.bfloat16)
    seen = []

    def spy(logits, cfg_, bias=None):
        out = route(logits, cfg_, bias)
        seen.append((logits, out[1]))
        return out
    route = moe_module.route
    monkeypatch.setattr(moe_module, "route", spy)
    x = torch.randn(32, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y = moe(x)
    (logits, experts), = seen
    assert logits.dtype == torch.float32 and y.dtype == torch.bfloat16
    ref = F.linear(x.reshape(-1, cfg.hidden_size).float(), moe.router.weight.float())     # [N, E] fp32
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)
    assert torch.equal(experts, ref.softmax(-1).topk(2, dim=-1).indices)
