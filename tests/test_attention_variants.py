"""Attention variants (model/variants.py): workspace tokens (dense mask, all-gather CP method) and
adaptive span, each against a reference written here from its definition; whole-model layouts against
one process (loss and every gradient, fp32, 1e-5 relative to each tensor's scale)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.config import ConfigError, load_config
from megagpt.model.variants import (adaptive_span_attention, allgather_attention, insert_workspace, loss_tokens,
                                    workspace_mask, workspace_slots)
from megagpt.parallel.context import zigzag_shard, zigzag_unshard
from megagpt.parallel.state import ParallelState
from tests.dist import assert_close_rel, spawn
from tests.test_context_parallel import _merged, _raw, _trainer_worker

RTOL = 1e-5


def _ref_mask(s, n, every, window):
    """Key j visible to query i, from the definition, one pair at a time."""
    def ws(p):
        return (p % every < n) if every else p < n
    return torch.tensor([[j <= i and ((window is None or i - j < window) or ws(j) or ws(i)) for j in range(s)]
                         for i in range(s)])


def test_workspace_slots_mask_and_insertion():
    assert workspace_slots(12, 2, 5).tolist() == [p % 5 < 2 for p in range(12)]
    assert workspace_slots(6, 2, None).tolist() == [True, True, False, False, False, False]
    pos = torch.arange(24)
    for n, every, window in ((2, None, 3), (2, 8, 4), (1, 6, None), (3, 10, 1)):
        want = _ref_mask(24, n, every, window)
        assert torch.equal(workspace_mask(pos, pos, window, workspace_slots(24, n, every)), want)
    m = load_config(None, ["train.seq_len=16", "model.workspace_tokens=2", "model.workspace_every=8",
                           "model.max_seq_len=64"]).model
    assert loss_tokens(m, 16) == 12
    tokens = torch.arange(100, 117)[None]
    t, lab = insert_workspace(m, tokens[:, :-1], tokens[:, 1:])
    text = ~workspace_slots(16, 2, 8)
    assert t[0, text].tolist() == list(range(100, 112)) and lab[0, text].tolist() == list(range(101, 113))
    assert t[0, ~text].tolist() == [0] * 4                          # the text runs on across the slots


def _ag_worker(rank, world, q, k, v, dout, m):
    ps = ParallelState.create(cp=world)
    cp = ps.cp
    local = [zigzag_shard(t, 1, cp.size, cp.rank).clone().requires_grad_(True) for t in (q, k, v)]
    out = allgather_attention(*local, cp, m, q.shape[1])
    out.backward(zigzag_shard(dout, 1, cp.size, cp.rank))
    return {"out": out.detach(), "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad,
            "bytes": dict(ps.counter.summary())}


@pytest.mark.parametrize("cp,every,window", [(2, None, 3), (2, 8, 5), (4, 12, 2)])
def test_allgather_cp_matches_the_dense_mask(cp, every, window):
    m = load_config(None, ["train.seq_len=32", "model.max_seq_len=64", "model.workspace_tokens=2",
                           f"model.attention_window={window}"] + ([f"model.workspace_every={every}"] if every else [])
                    ).model
    g = torch.Generator().manual_seed(cp)
    b, s, nq, nkv, d = 2, 32, 4, 2, 8
    q, dout = torch.randn(b, s, nq, d, generator=g), torch.randn(b, s, nq, d, generator=g)
    k, v = torch.randn(b, s, nkv, d, generator=g), torch.randn(b, s, nkv, d, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    mask = _ref_mask(s, 2, every, window)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2)
    ref.backward(dout)
    res = spawn(cp, _ag_worker, q, k, v, dout, m)
    for key, want in (("out", ref.detach()), ("dq", leaves[0].grad), ("dk", leaves[1].grad), ("dv", leaves[2].grad)):
        assert_close_rel(zigzag_unshard([r[key] for r in res], 1), want, RTOL, f"cp{cp} {key}")
    block = 2 * b * (s // cp) * nkv * d * 4
    assert all(r["bytes"] == {"cp/all_gather": block, "cp/reduce_scatter": cp * block} for r in res)


def _ref_span(q, k, v, z, ramp):
    """Adaptive span from the paper, one query row at a time: softmax over the past, times the ramp
    m(x) = clamp((R + z - x) / R, 0, 1) of the distance, renormalised."""
    b, s, nq, d = q.shape
    g = nq // k.shape[2]
    out = torch.zeros(b, s, nq, d)
    for h in range(nq):
        for i in range(s):
            a = torch.softmax(torch.einsum("bd,bjd->bj", q[:, i, h], k[:, : i + 1, h // g]) / d ** 0.5, -1)
            x = torch.arange(i, -1, -1, dtype=torch.float32)
            w = a * ((ramp + z[h] - x) / ramp).clamp(0, 1)
            out[:, i, h] = torch.einsum("bj,bjd->bd", w / w.sum(-1, keepdim=True), v[:, : i + 1, h // g])
    return out


def test_adaptive_span_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    b, s, nq, nkv, d, ramp, smax = 2, 20, 4, 2, 8, 4, 20
    q, k, v = torch.randn(b, s, nq, d, generator=g), torch.randn(b, s, nkv, d, generator=g), torch.randn(
        b, s, nkv, d, generator=g)
    p = torch.tensor([0.1, 0.35, 0.62, 1.4])                           # spans 2, 7, 12.4, 20 (clamped)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, p)]
    got = adaptive_span_attention(*leaves[:3], leaves[3], ramp, smax)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v, p)]
    ref = _ref_span(*ref_leaves[:3], ref_leaves[3].clamp(0, 1) * smax, ramp)
    assert_close_rel(got, ref, RTOL, "span out")
    dout = torch.randn(b, s, nq, d, generator=g)
    got.backward(dout)
    ref.backward(dout)
    for a, e, name in zip(leaves, ref_leaves, "qkvp"):
        assert_close_rel(a.grad, e.grad, RTOL, f"span d{name}")
    assert leaves[3].grad[:3].abs().min() > 0 and leaves[3].grad[3] == 0  # the clamp stops a span at 1


# ----------------------------------------------------------------------------- bad input

def test_bad_variant_configs_are_one_line_errors():
    def check(overrides, world, match):
        with pytest.raises(ConfigError, match=match) as e:
            load_config(None, ["model.max_seq_len=64", "train.seq_len=32", "model.num_heads=4",
                               "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2"] + overrides,
                        world_size=world)
        assert "\n" not in str(e.value)
    check(["model.workspace_tokens=2", "parallel.cp=2", "model.cp_attention=ring"], 2,
          "model.workspace_tokens: the ring serves causal and window masks only")
    check(["model.adaptive_span=true", "parallel.cp=2", "model.cp_attention=ring"], 2,
          "model.adaptive_span: the ring serves causal and window masks only, not the adaptive span")
    check(["model.adaptive_span=true", "model.attention_window=4"], 1, "model.adaptive_span: not combined")
    check(["model.workspace_tokens=40"], 1, r"model.workspace_tokens: expected 0 <= n < train.seq_len=32")
    check(["model.workspace_tokens=4", "model.workspace_every=4"], 1, "model.workspace_every: expected")
    check(["model.workspace_every=4"], 1, "model.workspace_every: needs model.workspace_tokens")
    check(["model.cp_attention=zigzag"], 1, "model.cp_attention: expected one of auto, ring, allgather")
    check(["model.adaptive_span=true", "model.span_ramp=0"], 1, "model.span_ramp")
    from megagpt.checkpoint.hf import ConversionError, to_hf_config
    for over in (["model.workspace_tokens=2"], ["model.adaptive_span=true"]):
        with pytest.raises(ConversionError, match="Llama") as e:
            to_hf_config(load_config(None, over + ["train.seq_len=32"]).model)
        assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- whole model, trainer path

_WS = dict(workspace_tokens=2, workspace_every=8, attention_window=3)
CASES = {  # name: (world, raw config); dp is what remains of the world
    "ws-cp2-tp2-sp-selective": (4, _raw(dict(cp=2, tp=2, sequence_parallel=True), _WS, dict(recompute="selective"))),
    "ws-cp2-dp2-zero1": (4, _raw(dict(cp=2, distributed_optimizer=True, bucket_size_mb=0.05), dict(workspace_tokens=3))),
    "ws-pp2-tp2-sp-tied": (4, _raw(dict(pp=2, tp=2, sequence_parallel=True), dict(_WS, tie_embeddings=True))),
    "window-cp2-allgather": (2, _raw(dict(cp=2), dict(attention_window=5, cp_attention="allgather"))),
    "span-pp2-dp2": (4, _raw(dict(pp=2), dict(adaptive_span=True, span_ramp=4, span_penalty=0.01))),
    "span-cp2-tp2": (4, _raw(dict(cp=2, tp=2), dict(adaptive_span=True, span_ramp=4, span_penalty=0.01))),
}


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    cache = {}

    def run(model: dict):
        key = repr(sorted(model.items()))
        if key not in cache:
            cache[key] = spawn(1, _trainer_worker, _raw(model=dict(model)), str(tmp_path_factory.mktemp("s")))[0]
        return cache[key]
    return run


@pytest.mark.parametrize("case", list(CASES))
def test_variant_layout_matches_one_process(case, serial, tmp_path):
    from megagpt.comm_model import expected_comm_bytes
    from megagpt.config import config_from_dict
    world, raw = CASES[case]
    ref = serial(raw["model"])
    res = spawn(world, _trainer_worker, raw, str(tmp_path), timeout=240)
    if not raw["parallel"]["distributed_optimizer"]:
        assert abs(res[0]["loss0"] - ref["loss0"]) <= RTOL * abs(ref["loss0"])
        grads = _merged(res, "grads")
        assert sorted(grads) == sorted(ref["grads"])
        for name, want in ref["grads"].items():
            assert_close_rel(grads[name], want, RTOL, f"{case} grad {name}")
    for got, want in zip(res[0]["losses"], ref["losses"]):
        assert abs(got - want) <= RTOL * abs(want), (case, res[0]["losses"], ref["losses"])
    params = _merged(res, "params")
    for name, want in ref["params"].items():
        assert_close_rel(params[name], want, RTOL, f"{case} param {name}")
    cfg = config_from_dict(raw, world)
    for rank, r in enumerate(res):
        measured = {(k, g): n for k, g, n in r["comm"]}
        assert measured == expected_comm_bytes(cfg, world, rank=rank, backend="gloo"), f"{case} rank {rank}"


def _span_step_worker(rank, world, raw, run_dir):
    import contextlib
    import io

    from megagpt.config import config_from_dict
    from megagpt.train import Trainer
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(config_from_dict(raw, world), run_dir)
        rec = tr.train_step()
    return {k: v for k, v in rec.items() if k.startswith("span/")}


def test_span_penalty_gradient_and_logged_spans(tmp_path):
    """The penalty coeff * mean_h z_h per layer reaches each span parameter as coeff * max_seq_len / heads
    (spans start at the whole context, inside the clamp) and nowhere else; a training step logs the mean
    span of every layer; generation refuses the variant in one line."""
    from megagpt.model.gpt import build_model
    from tests.dist import batch, tiny_model_cfg
    grads = {}
    for coeff in (0.0, 0.5):
        cfg = tiny_model_cfg(adaptive_span=True, span_ramp=4, span_penalty=coeff, use_flash_attn=False)
        model = build_model(cfg, seed=3)
        tokens, labels = batch(cfg, b=2, s=16)
        model(tokens, labels).mean().backward()
        grads[coeff] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads[0.5].items():
        want = grads[0.0][name] + (0.5 * cfg.max_seq_len / cfg.num_heads if name.endswith("attention.span") else 0)
        assert_close_rel(g, want, RTOL, name)
    raw = _raw(model=dict(adaptive_span=True, span_ramp=4, span_penalty=0.01))
    spans = spawn(1, _span_step_worker, raw, str(tmp_path))[0]
    assert sorted(spans) == ["span/layer0", "span/layer1"] and all(0 < z <= 64 for z in spans.values()), spans
    from megagpt.kv_cache import KVCache
    with pytest.raises(ValueError, match="generation: workspace tokens and adaptive span"):
        model.eval()(tokens[:1, :4], cache=KVCache(model, 1, 8))


@pytest.mark.parametrize("n,every,window,block", [(2, None, 3, 8), (2, 8, 5, 8), (1, 12, None, 16), (3, 10, 20, 7),
                                                  (0, None, 6, 8)])
def test_blocked_attention_matches_the_dense_mask(n, every, window, block):
    """The one-process block-sparse path (queries in blocks against the keys their window reaches and
    the workspace keys, workspace rows against everything): output and dq, dk, dv equal dense SDPA."""
    from megagpt.config import ModelConfig
    from megagpt.model.variants import blocked_attention
    m = ModelConfig(workspace_tokens=n, workspace_every=every, attention_window=window)
    g = torch.Generator().manual_seed(n + block)
    b, s, nq, nkv, d = 2, 40, 4, 2, 8
    q, dout = torch.randn(b, s, nq, d, generator=g), torch.randn(b, s, nq, d, generator=g)
    k, v = torch.randn(b, s, nkv, d, generator=g), torch.randn(b, s, nkv, d, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), attn_mask=_ref_mask(s, n, every, window),
                                         enable_gqa=True).transpose(1, 2)
    ref.backward(dout)
    got_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    got = blocked_attention(*got_leaves, m, block)
    got.backward(dout)
    assert_close_rel(got, ref.detach(), RTOL, "blocked out")
    for a, e, name in zip(got_leaves, leaves, "qkv"):
        assert_close_rel(a.grad, e.grad, RTOL, f"blocked d{name}")


def test_workspace_model_slots_carry_vectors_and_no_loss():
    """The model puts the workspace vectors at the slots (their gradient flows; the dummy token there
    gets none), the slots' losses are zero, and the text losses change with the workspace (it is seen)."""
    from megagpt.model.gpt import build_model
    from tests.dist import tiny_model_cfg
    cfg = tiny_model_cfg(workspace_tokens=2, workspace_every=8, attention_window=3, use_flash_attn=False,
                         vocab_size=50)
    model = build_model(cfg, seed=5)
    g = torch.Generator().manual_seed(1)
    tokens, labels = insert_workspace(cfg, torch.randint(1, 50, (2, 24), generator=g),
                                      torch.randint(1, 50, (2, 24), generator=g))
    losses = model(tokens, labels)
    slots = workspace_slots(24, 2, 8)
    assert (losses[:, slots] == 0).all() and (losses[:, ~slots] > 0).all()
    losses.sum().backward()
    assert model.workspace.grad.abs().min() > 0 and model.embedding.weight.grad[0].abs().max() == 0
    with torch.no_grad():
        model.workspace.mul_(3.0)
        assert not torch.allclose(model(tokens, labels)[:, ~slots][:, 8:], losses.detach()[:, ~slots][:, 8:])


def test_measured_activation_memory_with_workspace_at_cp2():
    """Bytes autograd keeps for backward per rank (activation_meter): with workspace tokens, CP2 (the
    all-gather method, which keeps the gathered K/V) holds about half of one process (block-sparse)."""
    from tests.dist import batch, tiny_model_cfg
    from tests.test_context_parallel import _meter_worker
    cfg = tiny_model_cfg(max_seq_len=512, use_flash_attn=False, workspace_tokens=4, workspace_every=128)
    tokens, labels = batch(cfg, b=1, s=512)
    one = spawn(1, _meter_worker, cfg, tokens, labels)[0]
    two = spawn(2, _meter_worker, cfg, tokens, labels)
    assert two[0] == two[1] and 0.45 < two[0] / one < 0.55, (one, two)


def test_window_keeps_no_s2_activations():
    """A sliding window without flash-attn runs block-sparse (blocked_attention): the bytes autograd keeps
    grow linearly in s and stay near full causal attention's (whose fused kernel keeps q, k, v, out and
    the LSE); the dense-mask SDPA it replaced kept the [s, s] mask, 1.6x full causal at s = 1024.
    A window saves FLOPs, not activation memory: memory.py counts the same bytes with or without one."""
    from tests.dist import batch, tiny_model_cfg
    from tests.test_context_parallel import _meter_worker
    got = {}
    for s in (512, 1024):
        for window in (None, 64):
            cfg = tiny_model_cfg(max_seq_len=s, use_flash_attn=False, attention_window=window)
            got[s, window] = spawn(1, _meter_worker, cfg, *batch(cfg, b=1, s=s))[0]
    assert got[1024, 64] / got[512, 64] < 2.05, got
    assert got[1024, 64] / got[1024, None] < 1.2, got
