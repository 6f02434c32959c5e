"""Context parallelism: zigzag sharding, ring attention against dense causal SDPA, and whole-model
layouts with CP against one process (loss and every gradient, fp32, 1e-5 relative to each tensor's scale)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.config import ConfigError, load_config
from megagpt.layout import Layout
from megagpt.parallel.context import ring_attention, zigzag_index, zigzag_shard, zigzag_unshard
from megagpt.parallel.state import ParallelState
from tests.dist import assert_close_rel, spawn

RTOL = 1e-5


# ----------------------------------------------------------------------------- zigzag

def test_zigzag_index_and_round_trip():
    assert zigzag_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert zigzag_index(8, 4, 1).tolist() == [1, 6]
    for cp in (1, 2, 4):
        ids = torch.cat([zigzag_index(32, cp, r) for r in range(cp)])
        assert sorted(ids.tolist()) == list(range(32))            # every position held exactly once
    x = torch.randn(3, 24, 5)
    mask = torch.rand(3, 24) > 0.3                                 # a loss mask is cut like the tokens
    for cp in (2, 3):
        pieces = [zigzag_shard(x, 1, cp, r) for r in range(cp)]
        assert pieces[0].shape == (3, 24 // cp, 5)
        assert torch.equal(zigzag_unshard(pieces, 1), x)
        assert torch.equal(zigzag_unshard([zigzag_shard(mask, 1, cp, r) for r in range(cp)], 1), mask)
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=4"):
        zigzag_index(10, 2, 0)


# ----------------------------------------------------------------------------- ring attention vs dense

def _dense(q, k, v, window=None):
    """q [b, s, nq, d], k/v [b, s, nkv, d] -> causal SDPA [b, s, nq, d]; a window as a dense bool mask
    written here from its definition (key j visible to query i iff i - window < j <= i)."""
    i = torch.arange(q.shape[1])
    mask = None if window is None else (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=mask is None, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _ring_worker(rank, world, q, k, v, dout, kernel, window=None):
    ps = ParallelState.create(cp=world)
    cp = ps.cp
    local = [zigzag_shard(t, 1, cp.size, cp.rank).clone().requires_grad_(True) for t in (q, k, v)]
    out = ring_attention(*local, cp, kernel=kernel, window=window)
    out.backward(zigzag_shard(dout, 1, cp.size, cp.rank))
    return {"out": out.detach(), "dq": local[0].grad, "dk": local[1].grad, "dv": local[2].grad,
            "bytes": dict(ps.counter.summary())}


@pytest.mark.parametrize("cp,nkv,kernel", [(2, 2, "math"), (4, 1, "math"), (2, 2, "cpu_fused"), (4, 1, "cpu_fused")])
def test_ring_attention_matches_dense(cp, nkv, kernel):
    """Output and dq, dk, dv of every rank, unsharded, equal dense causal SDPA on the whole sequence
    (GQA and MQA), for the math kernel and torch's fused CPU kernel."""
    g = torch.Generator().manual_seed(cp)
    b, s, nq, d = 2, 32, 4, 8
    q, dout = torch.randn(b, s, nq, d, generator=g), torch.randn(b, s, nq, d, generator=g)
    k, v = torch.randn(b, s, nkv, d, generator=g), torch.randn(b, s, nkv, d, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = _dense(*leaves)
    ref.backward(dout)
    res = spawn(cp, _ring_worker, q, k, v, dout, kernel)
    for key, want in (("out", ref.detach()), ("dq", leaves[0].grad), ("dk", leaves[1].grad), ("dv", leaves[2].grad)):
        got = zigzag_unshard([r[key] for r in res], 1)
        assert_close_rel(got, want, RTOL, f"cp{cp} {kernel} {key}")
    # every rank sends (cp-1) K/V blocks forward, (cp-1) again and cp fp32 dK/dV blocks backward
    kv_block = 2 * b * (s // cp) * nkv * d * 4
    want_bytes = (2 * (cp - 1) + cp) * kv_block
    for r in res:
        assert r["bytes"] == {"cp/recv": want_bytes, "cp/send": want_bytes}


def test_ring_attention_bf16_tracks_fp32():
    """bf16 inputs (blocks merged in fp32, dK/dV accumulated in fp32 around the ring): CP4 stays within
    bf16 rounding of the fp32 dense result, as the one-process bf16 SDPA does."""
    g = torch.Generator().manual_seed(4)
    b, s, nq, nkv, d = 2, 64, 4, 2, 16
    q, dout = torch.randn(b, s, nq, d, generator=g), torch.randn(b, s, nq, d, generator=g)
    k, v = torch.randn(b, s, nkv, d, generator=g), torch.randn(b, s, nkv, d, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    _dense(*leaves).backward(dout)
    low = [t.bfloat16().requires_grad_(True) for t in (q, k, v)]
    ref_bf16 = _dense(*low)
    ref_bf16.backward(dout.bfloat16())
    res = spawn(4, _ring_worker, *(t.bfloat16() for t in (q, k, v, dout)), "auto")
    got = zigzag_unshard([r["dk"] for r in res], 1)
    assert got.dtype == torch.bfloat16
    err = (got.float() - leaves[1].grad).abs().max() / leaves[1].grad.abs().max()
    err_serial = (low[1].grad.float() - leaves[1].grad).abs().max() / leaves[1].grad.abs().max()
    assert err < max(2 * err_serial, 1e-2), (err, err_serial)


@pytest.mark.parametrize("cp,window,kernel", [(2, 3, "auto"), (2, 13, "auto"), (4, 6, "auto"), (4, 20, "math"),
                                               (2, 32, "auto")])
def test_ring_sliding_window_matches_the_dense_mask(cp, window, kernel):
    """A window inside a chunk (3 < s/2cp), across chunks, and as wide as the sequence: exact, and the
    ring still sends every K/V block (a window never changes the bytes)."""
    g = torch.Generator().manual_seed(window)
    b, s, nq, nkv, d = 1, 32, 4, 2, 8
    q, dout = torch.randn(b, s, nq, d, generator=g), torch.randn(b, s, nq, d, generator=g)
    k, v = torch.randn(b, s, nkv, d, generator=g), torch.randn(b, s, nkv, d, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = _dense(*leaves, window)
    ref.backward(dout)
    if window < s:                                                 # the window changes the result
        assert not torch.allclose(ref, _dense(q, k, v), atol=1e-3)
    res = spawn(cp, _ring_worker, q, k, v, dout, kernel, window)
    for key, want in (("out", ref.detach()), ("dq", leaves[0].grad), ("dk", leaves[1].grad), ("dv", leaves[2].grad)):
        assert_close_rel(zigzag_unshard([r[key] for r in res], 1), want, RTOL, f"cp{cp} window {window} {key}")
    kv_block = 2 * b * (s // cp) * nkv * d * 4
    assert all(r["bytes"]["cp/send"] == (2 * (cp - 1) + cp) * kv_block for r in res)


def test_sliding_window_kv_cache_matches_recompute():
    """Generation with a window: cached decoding (the band over cache slots, left padding included)
    gives the logits of full recompute."""
    from megagpt.generate import generate_recompute
    from megagpt.kv_cache import KVCache
    from megagpt.model.gpt import build_model
    from tests.dist import tiny_model_cfg
    model = build_model(tiny_model_cfg(attention_window=4, use_flash_attn=False), seed=7).eval()
    prompt = torch.tensor([[5, 17, 99, 3, 8, 1], [0, 0, 42, 7, 7, 8]])
    pad = torch.tensor([0, 2])
    ref, ref_logits = generate_recompute(model, prompt[:1, :4], 6)          # 10 tokens: the window of 4 matters
    cache = KVCache(model, 1, 10)
    with torch.no_grad():
        got = [model.gather_logits(model(prompt[:1, :4], cache=cache))[:, -1]]
        for t in range(5):
            got.append(model.gather_logits(model(ref[:, 4 + t:5 + t], cache=cache))[:, -1])
    for a, e in zip(got, ref_logits):
        assert_close_rel(a, e, RTOL, "window cache")
    # left padding: row 1 alone (no pad) against row 1 padded by 2 in a batch, one prefill + steps
    alone = KVCache(model, 1, 8)
    padded = KVCache(model, 2, 8, pad)
    with torch.no_grad():
        a = model.gather_logits(model(prompt[1:, 2:], cache=alone))[:, -1]
        b = model.gather_logits(model(prompt, cache=padded))[1:, -1]
        assert_close_rel(b, a, RTOL, "window cache, padded")
        nxt = torch.tensor([[9], [9]])
        a = model.gather_logits(model(nxt[1:], cache=alone))[:, -1]
        b = model.gather_logits(model(nxt, cache=padded))[1:, -1]
        assert_close_rel(b, a, RTOL, "window cache, padded step")


@pytest.mark.parametrize("kernel", ["math", "cpu_fused"])
def test_ring_attention_one_rank_is_dense(kernel):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, 2, 4, generator=g, requires_grad=True) for _ in range(3))
    out = ring_attention(q, k, v, ParallelState.single().cp, kernel=kernel)
    assert_close_rel(out, _dense(q, k, v), RTOL, "cp1")
    with pytest.raises(ValueError, match="the flash kernel needs flash-attn, CUDA"):
        ring_attention(q, k, v, ParallelState.single().cp, kernel="flash")


def _ring_order_worker(rank, world, q, k, v, dout):
    """The backward's events in order: each block's gradient compute and each wait on a dK/dV accumulator
    (bf16 inputs: the K/V message is bf16, the accumulator fp32, so a wait is known by what was posted)."""
    from megagpt.parallel import context
    ps = ParallelState.create(cp=world)
    local = [zigzag_shard(t, 1, world, rank).bfloat16().requires_grad_(True) for t in (q, k, v)]
    events, post, wait, bwd = [], context._Ring.post, context._wait, context._math_bwd

    def tagged_post(self, t):
        buf, works = post(self, t)
        return buf, [(w, "dkv" if t.dtype == torch.float32 else "kv") for w in works]

    def tagged_wait(works):
        events.extend({f"wait {tag}" for _, tag in works})
        wait([w for w, _ in works])

    def logged_bwd(*a):
        events.append("compute")
        return bwd(*a)
    context._Ring.post, context._wait, context._math_bwd = tagged_post, tagged_wait, logged_bwd
    try:                                          # the forward picks the block kernels: patched first
        out = ring_attention(*local, ps.cp, kernel="math")
        out.backward(zigzag_shard(dout, 1, world, rank).bfloat16())
    finally:
        context._Ring.post, context._wait, context._math_bwd = post, wait, bwd
    return [e for e in events if e != "wait kv"]


def test_ring_backward_overlaps_the_dkv_hop_with_compute():
    """Block i's gradients are computed before the wait on its dK/dV accumulator (which the previous
    rank posted after its own block i - 1), so that hop overlaps compute, as the planner assumes."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 16, 2, 4, generator=g) for _ in range(4))
    for events in spawn(4, _ring_order_worker, q, k, v, dout):   # (before: wait, then compute)
        assert events == ["compute"] + ["compute", "wait dkv"] * 3 + ["wait dkv"], events


# ----------------------------------------------------------------------------- bad input

def test_bad_layouts_are_one_line_errors():
    def check(overrides, world, match):
        with pytest.raises(ConfigError, match=match) as e:
            load_config(None, ["model.max_seq_len=64", "train.seq_len=30", "model.num_heads=4",
                               "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=2"] + overrides,
                        world_size=world)
        assert "\n" not in str(e.value)
    check(["parallel.cp=2"], 2, r"train.seq_len: 30 is not divisible by 2\*parallel.cp=4")
    check(["parallel.cp=3", "train.seq_len=24"], 4, r"parallel.world_size: 4 is not divisible by tp\*cp\*pp")
    check(["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=32",
           "model.hidden_dropout=0.1"], 4, "model.hidden_dropout: hidden dropout with parallel.cp=2 needs")
    check(["parallel.cp=2", "train.seq_len=32", "model.attention_dropout=0.1"], 2, "model.attention_dropout")
    check(["parallel.cp=2", "parallel.tp=3", "train.seq_len=32", "model.num_heads=3", "model.hidden_size=36",
           "model.ffn_hidden_size=36", "parallel.sequence_parallel=true"], 6, r"train.seq_len: 32/cp=16")
    check(["train.seq_len=32", "model.attention_window=40"], 1,
          r"model.attention_window: expected 1 <= window <= train.seq_len=32, got 40")
    check(["train.seq_len=32", "model.attention_window=0"], 1, r"model.attention_window: expected 1 <= window")
    from megagpt.checkpoint.hf import ConversionError, to_hf_config
    with pytest.raises(ConversionError, match="model.attention_window: Llama attends to the whole context"):
        to_hf_config(load_config(None, ["model.attention_window=16", "train.seq_len=32"]).model)
    layout = Layout(cp=2, tp=2, sp=True, seq_len=64, world_size=8)
    assert layout.dp == 2 and layout.activation_shape(load_config(None, []).model)[0] == 16


# ----------------------------------------------------------------------------- whole model, trainer path

def _raw(parallel=None, model=None, train=None, dp=1) -> dict:
    m = dict(vocab_size=1024, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
             ffn_hidden_size=96, make_vocab_divisible_by=8, init_std=0.05)
    t = dict(seq_len=32, micro_batch_size=1, global_batch_size=4, train_iters=2, eval_interval=0, save_interval=0,
             warmup=0, lr=1e-3, dtype="fp32", adam_eps=1e-3)  # eps above the grads: the update is ~linear in
    p = dict(distributed_optimizer=False)                          # them, so params compare as well as grads do
    return {"model": {**m, **(model or {})}, "parallel": {**p, **(parallel or {})}, "train": {**t, **(train or {})}}


CASES = {  # name: (world, raw config); dp is what remains of the world
    "cp2-micro2": (2, _raw(dict(cp=2), train=dict(micro_batch_size=2))),     # [2, s/cp] microbatches
    "cp4": (4, _raw(dict(cp=4))),
    "cp2-tp2-sp-mqa-selective": (4, _raw(dict(cp=2, tp=2, sequence_parallel=True), dict(num_kv_heads=1),
                                         dict(recompute="selective"))),
    "cp2-pp2-tied-full-recompute": (4, _raw(dict(cp=2, pp=2), dict(tie_embeddings=True), dict(recompute="full"))),
    "cp2-dp2-zero1": (4, _raw(dict(cp=2, distributed_optimizer=True, bucket_size_mb=0.05))),
    "cp2-dp2-zero2": (4, _raw(dict(cp=2, distributed_optimizer=True, bucket_size_mb=0.05), train=dict(dp_mode="zero2"))),
    "cp2-dp2-zero3": (4, _raw(dict(cp=2, distributed_optimizer=True), train=dict(dp_mode="zero3"))),
    "cp2-pp2-zero3-tied": (4, _raw(dict(cp=2, pp=2, distributed_optimizer=True), dict(tie_embeddings=True),
                                   dict(dp_mode="zero3"))),
    "cp2-tp2-sp-pp2": (8, _raw(dict(cp=2, tp=2, pp=2, sequence_parallel=True))),
    # hidden dropout: each CP rank draws the whole sequence's mask and keeps its rows (parallel/random.py)
    "cp2-tp2-dropout-full-recompute": (4, _raw(dict(cp=2, tp=2), dict(hidden_dropout=0.2), dict(recompute="full"))),
    "cp2-window": (2, _raw(dict(cp=2), dict(attention_window=5))),          # cuts blocks, hides whole ones
    "cp4-window-selective": (4, _raw(dict(cp=4), dict(attention_window=11), dict(recompute="selective"))),
}


def _trainer_worker(rank, world, raw, run_dir):
    import contextlib
    import io

    from comm_intercept import CommInterceptor, group_names
    from megagpt.config import config_from_dict
    from megagpt.optim.finalize import finalize_grads
    from megagpt.train import Trainer
    from tests.dist import gather_full
    cfg = config_from_dict(raw, world)
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(cfg, run_dir)
    ps, opt, t = tr.ps, tr.optimizer, cfg.train
    main = ps.cp.rank == 0 and ps.dp.rank == 0 and ps.tp.rank == 0   # one writer per pipeline stage
    out = {"grads": {}, "params": {}}
    if not getattr(opt, "distributed", True):  # (zero2/3 have no plain path) the whole reduced gradient sits in every rank's main_grad
        opt.zero_grad()
        opt.set_sync(False)
        per_mb = tr.engine.forward_backward(tr._microbatch_fn(tr.train_data, 0), tr.num_microbatches,
                                            1.0 / (t.global_batch_size * t.seq_len),
                                            before_last_backward=lambda: opt.set_sync(True))
        opt.buffer.finish_grad_sync()
        finalize_grads(tr.chunks, ps)
        out["loss0"] = tr._global_loss(per_mb)
        grads = {n: gather_full(p.main_grad, p.meta.spec, ps.tp) for c in tr.chunks for n, p in c.named_parameters()}
        out["grads"] = grads if main else {}
    losses = []
    for _ in range(t.train_iters):
        ps.counter.reset()
        with CommInterceptor(group_names(ps)) as seen:
            losses.append(tr.train_step()["loss"])
        assert (dict(seen.records), dict(seen.calls)) == (dict(ps.counter.records), dict(ps.counter.calls)), \
            f"torch.distributed saw {dict(seen.records)}, the counter {dict(ps.counter.records)}"
    comm = [[k, g, n] for (k, g), n in sorted(ps.counter.records.items())]   # the last step's, before the
    opt.finish_param_sync()                                  # whole-weight gather below (zero3: every unit)
    params = {n: gather_full(p, p.meta.spec, ps.tp) for c in tr.chunks for n, p in c.named_parameters()}
    out.update(losses=losses, params=params if main else {}, comm=comm)
    return out


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The one-process run of the same model, data and steps, per model config (the plain and the
    distributed optimizer agree at dp = 1; recompute changes no number)."""
    cache = {}

    def run(model: dict):
        key = repr(sorted(model.items()))
        if key not in cache:
            raw = _raw(model={k: v for k, v in model.items()})
            cache[key] = spawn(1, _trainer_worker, raw, str(tmp_path_factory.mktemp("serial")))[0]
        return cache[key]
    return run


def _merged(results, key):
    out = {}
    for r in results:
        out.update(r[key])
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_one_process(case, serial, tmp_path):
    from megagpt.comm_model import expected_comm_bytes
    from megagpt.config import config_from_dict
    world, raw = CASES[case]
    serial = serial(raw["model"])
    res = spawn(world, _trainer_worker, raw, str(tmp_path), timeout=240)
    if not raw["parallel"]["distributed_optimizer"]:
        assert abs(res[0]["loss0"] - serial["loss0"]) <= RTOL * abs(serial["loss0"])
        grads = _merged(res, "grads")
        assert sorted(grads) == sorted(serial["grads"])
        for name, want in serial["grads"].items():
            assert_close_rel(grads[name], want, RTOL, f"{case} grad {name}")
    for got, want in zip(res[0]["losses"], serial["losses"]):
        assert abs(got - want) <= RTOL * abs(want), (case, res[0]["losses"], serial["losses"])
    params = _merged(res, "params")
    for name, want in serial["params"].items():       # after two AdamW steps: 1e-5 of each tensor's scale
        assert_close_rel(params[name], want, RTOL, f"{case} param {name}")
    cfg = config_from_dict(raw, world)
    for rank, r in enumerate(res):                     # the step's bytes equal the comm model, per rank
        measured = {(k, g): n for k, g, n in r["comm"]}
        assert measured == expected_comm_bytes(cfg, world, rank=rank, backend="gloo"), f"{case} rank {rank}"
        assert measured.get(("send", "cp"), 0) > 0


# ----------------------------------------------------------------------------- planner and memory

def test_memory_model_activations_fall_by_cp():
    from megagpt.config import ModelConfig
    from megagpt.memory import memory_per_rank
    m = ModelConfig(vocab_size=32000, max_seq_len=32768, hidden_size=4096, num_layers=8, num_heads=32, num_kv_heads=8,
                    ffn_hidden_size=11008)
    one, two = (memory_per_rank(m, Layout(cp=cp, world_size=cp, seq_len=32768), distributed_optimizer=True)
                for cp in (1, 2))
    assert two["activations"] == pytest.approx(one["activations"] / 2)
    assert two["weights"] == one["weights"] and two["optimizer"] == pytest.approx(one["optimizer"] / 2)


def _meter_worker(rank, world, cfg, tokens, labels):
    from megagpt.activation_meter import SavedTensorMeter
    from megagpt.model.gpt import build_model
    ps = ParallelState.create(cp=world)
    model = build_model(cfg, ps)
    cut = [zigzag_shard(t, 1, world, ps.cp.rank) for t in (tokens, labels)]
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        model(*cut).sum()
    return meter.bytes


@pytest.mark.parametrize("cp", [2, 4])
def test_measured_activation_memory_per_rank_falls_by_cp(cp):
    """Bytes autograd keeps for backward (activation_meter), per rank: CP2 / CP4 hold 1/2 / 1/4 of CP1
    (the ring keeps q, k, v, its output and the fp32 LSE, as SDPA does, and nothing of size s^2)."""
    from tests.dist import batch, tiny_model_cfg
    cfg = tiny_model_cfg(max_seq_len=512)
    tokens, labels = batch(cfg, b=1, s=512)
    one = spawn(1, _meter_worker, cfg, tokens, labels)[0]
    per_rank = spawn(cp, _meter_worker, cfg, tokens, labels)
    assert len(set(per_rank)) == 1, per_rank
    assert 0.9 / cp < per_rank[0] / one < 1.1 / cp, (one, per_rank)


# ----------------------------------------------------------------------------- checkpoints

def _ckpt_worker(rank, world, raw, run_dir, load, iters):
    import contextlib
    import io

    from megagpt.config import config_from_dict
    from tests.dist import gather_full
    from megagpt.train import Trainer
    raw = {**raw, "train": {**raw["train"], "train_iters": iters, "save_interval": 1}}
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(config_from_dict(raw, world), run_dir, load=load)
        hist = tr.run()
    ps = tr.ps
    params = {n: gather_full(p, p.meta.spec, ps.tp) for c in tr.chunks for n, p in c.named_parameters()}
    return {"losses": [h["loss"] for h in hist], "params": params if rank == 0 else {}}


def _saved_tensors(step_dir):
    """Every tensor of a checkpoint by key (params under their names, optimizer state under optim/...),
    the ranges of all rank files put back together per key; a parameter must be written by one rank."""
    import glob
    import json
    import os

    from safetensors.torch import load_file
    out = {}
    for path in sorted(glob.glob(os.path.join(step_dir, "rank_*.safetensors"))):
        meta = json.load(open(path.replace(".safetensors", ".json")))
        for key, t in load_file(path).items():
            name = key.split("/")[1] if key.startswith("optim/") else key
            start = meta["optim"][name]["start"] if key.startswith("optim/") else 0
            full = out.setdefault(key, {})
            assert key.startswith("optim/") or not full, f"{key} written by two ranks"
            for i, x in enumerate(t.reshape(-1).tolist()):
                full[start + i] = x
    return {k: torch.tensor([v[i] for i in sorted(v)]) for k, v in out.items()}


def test_cp_never_changes_a_checkpoint(tmp_path):
    """A checkpoint saved at CP2 (ZeRO over dp x cp) holds the tensors a CP1 run saves (to 1e-5), and
    resuming either one at either CP gives the same next step."""
    import os
    raw = _raw(dict(distributed_optimizer=True))
    runs = {cp: str(tmp_path / f"cp{cp}") for cp in (1, 2)}
    for cp, run_dir in runs.items():
        spawn(cp, _ckpt_worker, {**raw, "parallel": {**raw["parallel"], "cp": cp}}, run_dir, None, 1)
    saved = {cp: _saved_tensors(os.path.join(d, "step_00000001")) for cp, d in runs.items()}
    assert sorted(saved[1]) == sorted(saved[2])
    for key, want in saved[1].items():
        assert_close_rel(saved[2][key], want, RTOL, f"saved {key}")
    resumed = {}
    for saved_cp, cp in ((1, 1), (1, 2), (2, 1)):   # (2, 2) is CP's own resume, as any layout's
        resumed[saved_cp, cp] = spawn(cp, _ckpt_worker, {**raw, "parallel": {**raw["parallel"], "cp": cp}},
                                      str(tmp_path / f"resume{saved_cp}{cp}"), runs[saved_cp], 2)[0]
    ref = resumed[1, 1]
    for key, got in resumed.items():
        assert len(got["losses"]) == 1 and abs(got["losses"][0] - ref["losses"][0]) <= RTOL * ref["losses"][0], key
        for name, want in ref["params"].items():
            assert_close_rel(got["params"][name], want, RTOL, f"resume {key} {name}")


def test_dry_run_with_cp():
    """`--dry-run --cp`: the layout carries cp, activations are this rank's s/cp tokens' (the memory
    model), weights do not shrink; a cp that does not divide the world is one line, exit 2."""
    import contextlib
    import io
    import json

    from megagpt.cli import main

    def dry(*args):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--dry-run", "--json", "--tp", "8", "--pp", "4", "--vp", "1", "--world-size", "1024",
                         "train.seq_len=32768", "train.global_batch_size=256", "train.recompute=full", *args],
                        default_config="examples/configs/gpt4plus-70b.yaml", use_planner=True)
        return code, out.getvalue(), err.getvalue()
    outs = {cp: dry("--cp", str(cp)) for cp in (1, 4)}
    r = {cp: json.loads(o[1].strip().splitlines()[-1]) for cp, o in outs.items()}
    assert r[4]["layout"]["cp"] == 4 and r[4]["layout"]["dp"] == 1024 // (8 * 4 * 4) and "cp=4" in outs[4][1]
    b1, b4 = r[1]["bytes_per_rank"], r[4]["bytes_per_rank"]
    assert b4["weights"] == b1["weights"] and b4["activations"] < b1["activations"] / 3
    code, _, err = dry("--cp", "3")
    assert code == 2 and err.count("\n") == 1 and "parallel.cp" in err, err
