"""ZeRO-2 and ZeRO-3 (train.dp_mode) against torch.optim.AdamW in one process.

The setting of test_optim_dp: 10 steps (5 through the pipeline engine) of the same global batch of 8 sequences, 2 microbatches per DP
rank, warm-up + cosine LR, weight decay, clipping active (norms ~2, clip 1.0), fp32. Every step's
global grad norm and every final parameter must equal the one-process run's to 1e-5 relative.
Layouts: zero2/zero3 x DP2, DP4 with padded groups (hidden 42: no size divides by 4), DP2xTP2+SP (MQA:
replicated K/V rows), and through the pipeline engine DP2xTP2xPP2 and DP2xPP2 with tied embeddings,
the latter under full activation recompute.
"""
import pytest
import torch

from dist import spawn
from megagpt.config import Config, ParallelConfig, TrainConfig, ConfigError, config_from_dict
from megagpt.model.gpt import build_model
from megagpt.optim.optimizer import DTYPES, build_optimizer
from megagpt.parallel.state import ParallelState
from test_optim_dp import (STEPS, compare_params, engine_worker, full_params, model_cfg, run_steps, serial_reference,
                           train_cfg)


def zero_worker(rank, world, mcfg, tcfg, pcfg, steps=STEPS):
    ps = ParallelState.create(tp=pcfg.tp)
    model = build_model(mcfg, ps, seed=tcfg.seed, sequence_parallel=pcfg.sequence_parallel,
                        dtype=DTYPES[tcfg.dtype])
    opt = build_optimizer([model], ps, tcfg, pcfg, mcfg)
    norms, losses, _ = run_steps(model, opt, ps, tcfg, steps)
    opt.finish_param_sync()
    out = {"params": full_params(model, ps), "norms": norms, "losses": losses, "padding": opt.padding(),
           "kind": type(opt).__name__}
    return out if rank == 0 else None


# (mode, dp, tp, sp, odd)
GRID = [(m, 2, 1, False, False) for m in ("zero2", "zero3")] + \
       [(m, 4, 1, False, True) for m in ("zero2", "zero3")] + \
       [(m, 2, 2, True, False) for m in ("zero2", "zero3")]


@pytest.mark.parametrize("mode,dp,tp,sp,odd", GRID,
                         ids=[f"{m}-dp{d}-tp{t}{'-sp' if s else ''}{'-padded' if o else ''}" for m, d, t, s, o in GRID])
def test_zero_matches_serial_adamw(mode, dp, tp, sp, odd):
    mcfg, tcfg = model_cfg(odd), train_cfg(dp, dp_mode=mode)
    ref = serial_reference(odd=odd, steps=10)
    assert max(ref["norms"]) > tcfg.clip_grad, "clipping must be active for this test to mean anything"
    pcfg = ParallelConfig(tp=tp, sequence_parallel=sp, bucket_size_mb=0.05)
    out = spawn(dp * tp, zero_worker, mcfg, tcfg, pcfg, 10)[0]
    assert len(out["norms"]) == 10
    assert out["kind"] == {"zero2": "ShardedOptimizer", "zero3": "Zero3Optimizer"}[mode]
    assert (out["padding"] > 0) == odd, f"group padding {out['padding']}"
    for step, (n, r) in enumerate(zip(out["norms"], ref["norms"])):
        assert abs(n - r) <= 1e-5 * r, f"step {step}: grad norm {n} != serial {r}"
    for step, (a, b) in enumerate(zip(out["losses"], ref["losses"])):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} != serial {b}"
    compare_params(out["params"], ref["params"], mcfg.vocab_size)


# (mode, tp, pp, recompute)
PIPE = [("zero2", 2, 2, "none", "1f1b"), ("zero3", 2, 2, "none", "1f1b"), ("zero3", 1, 2, "full", "1f1b"),
        ("zero3", 1, 2, "none", "gpipe"), ("zero3", 1, 2, "none", "interleaved"), ("zero3", 1, 1, "none", "1f1b"),
        ("zero2", 1, 1, "none", "1f1b")]


@pytest.mark.parametrize("mode,tp,pp,recompute,schedule", PIPE,
                         ids=[f"{m}-dp2-tp{t}-pp{p}-{r}-{s}" for m, t, p, r, s in PIPE])
def test_zero_with_pipeline_engine_tied(mode, tp, pp, recompute, schedule):
    """gpipe: every forward before the first backward, so the last stage's root (final norm, the tied
    head) must stay whole through all the backwards. interleaved: vp=2, 4 layers, two chunks per rank."""
    vp, layers = (2, 4) if schedule == "interleaved" else (1, 2)
    mcfg = model_cfg(tie_embeddings=True, num_layers=layers)
    cfg = Config(model=mcfg, train=train_cfg(2, dp_mode=mode, recompute=recompute,
                                             schedule="1f1b" if schedule == "interleaved" else schedule),
                 parallel=ParallelConfig(tp=tp, pp=pp, vp=vp, sequence_parallel=tp > 1, bucket_size_mb=1.0,
                                         world_size=2 * tp * pp))
    ref = serial_reference(True, layers)
    res = [r for r in spawn(2 * tp * pp, engine_worker, cfg, timeout=300) if r is not None]
    assert len(res) == pp                  # pp=1: the tied embedding and head in one root unit
    for r in res:
        for step, (n, nr) in enumerate(zip(r["norms"], ref["norms"])):
            assert abs(n - nr) <= 1e-5 * nr, f"step {step}: grad norm {n} != serial {nr}"
    assert torch.equal(res[0]["params"]["embedding.weight"], res[-1]["params"]["embedding.weight"])
    compare_params({n: v for r in res for n, v in r["params"].items()}, ref["params"], mcfg.vocab_size)


def test_dp_mode_errors_are_one_line():
    for over, needle in [({"train": {"dp_mode": "zero4"}}, "train.dp_mode: expected one of ddp, zero1, zero2, zero3"),
                         ({"train": {"dp_mode": "zero3"}, "parallel": {"distributed_optimizer": False}},
                          "train.dp_mode: zero3 shards"),
                         ({"train": {"dp_mode": "zero3"}, "parallel": {"ep": 2}}, "train.dp_mode: zero3 is not supported")]:
        with pytest.raises(ConfigError) as e:
            config_from_dict({**over, "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4,
                                                "ffn_hidden_size": 128, "max_seq_len": 64},
                              "train": {**over.get("train", {}), "seq_len": 32}}, world_size=4)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert TrainConfig().dp_mode == "zero1"


def test_trainer_resume_across_modes(tmp_path):
    """The training loop end to end (CLI, pipeline engine, checkpoints): zero3 on DP2 saves at step 3; a
    resume under zero3 reproduces steps 4-6 bit for bit, one under zero2 and one under zero1 to 1e-5."""
    import os
    from test_train_e2e import SMALL, TINY, _cli, _losses
    base = ["--config", TINY, *SMALL, "--train-iters", "6", "train.eval_interval=3", "train.global_batch_size=8"]
    spawn(2, _cli, base + ["train.dp_mode=zero3", "--save-interval", "3", "--run-dir", str(tmp_path / "full")],
          timeout=240)
    ckpt = os.path.join(str(tmp_path / "full"), "step_00000003")
    full = _losses(tmp_path / "full")
    for mode in ("zero3", "zero2", "zero1"):
        spawn(2, _cli, base + [f"train.dp_mode={mode}", "--load", ckpt, "--run-dir", str(tmp_path / mode)],
              timeout=240)
        got = _losses(tmp_path / mode)
        assert sorted(got) == [4, 5, 6], got
        for s in (4, 5, 6):
            if mode == "zero3":
                assert got[s] == full[s], (mode, s, got[s], full[s])
            else:
                assert abs(got[s] - full[s]) <= 1e-5 * full[s], (mode, s, got[s], full[s])


def test_ddp_mode_is_the_plain_optimizer():
    """train.dp_mode=ddp is what parallel.distributed_optimizer=false was (and still is)."""
    from megagpt.optim.adamw import PlainAdamW, ShardedAdamW
    mcfg = model_cfg()
    for tcfg, pcfg, want in [(train_cfg(1, dp_mode="ddp"), ParallelConfig(), PlainAdamW),
                             (train_cfg(1), ParallelConfig(distributed_optimizer=False), PlainAdamW),
                             (train_cfg(1), ParallelConfig(), ShardedAdamW)]:
        opt = build_optimizer([build_model(mcfg)], ParallelState.single(), tcfg, pcfg, mcfg)
        assert type(opt.update) is want


@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_bf16_tracks_fp32(mode):
    """bf16 weights (gathered in bf16 under zero3), fp32 reduce-scatters and main params, against the
    fp32 one-process run: test_optim_dp.test_bf16_tracks_fp32's bounds (losses 5e-3 nats, each matrix's
    update within 25% of the fp32 update in norm)."""
    mcfg = model_cfg()
    ref = serial_reference()
    init = {n: p.detach().clone() for n, p in build_model(mcfg, seed=train_cfg(1).seed).named_parameters()}
    out = spawn(2, zero_worker, mcfg, train_cfg(2, dtype="bf16", dp_mode=mode), ParallelConfig(bucket_size_mb=0.05))[0]
    for step, (a, b) in enumerate(zip(out["losses"], ref["losses"])):
        assert abs(a - b) <= 5e-3, f"step {step}: bf16 loss {a} vs fp32 {b}"
    for name, p in out["params"].items():
        if p.ndim < 2:
            continue
        want = ref["params"][name] - init[name]
        err = (p.float() - init[name] - want).norm() / want.norm()
        assert err <= 0.25, f"{name}: bf16 update is {err:.3f} of the fp32 update's norm away"


def prefetch_worker(rank, world):
    mcfg, tcfg = model_cfg(num_layers=4), train_cfg(world, dp_mode="zero3")
    ps = ParallelState.create()
    model = build_model(mcfg, ps, seed=tcfg.seed)
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(), mcfg)
    units = [opt.group_of[id(next(layer.parameters()))] for layer in model.layers.values()]
    seen = {"forward": [], "backward": []}
    for i, layer in enumerate(model.layers.values()):
        layer.register_forward_pre_hook(lambda *_, i=i: seen["forward"].append(
            [u.state for u in units[i:i + 2]]))      # the optimizer's pre-hook ran first: i whole, i+1 on its way
        out_hook = lambda grad, i=i: seen["backward"].append([u.state for u in units[max(0, i - 1):i + 1]])  # noqa
        layer.register_forward_hook(lambda _m, _a, out, h=out_hook: [out.register_hook(h)] and None)
    run_steps(model, opt, ps, tcfg, 1)
    return seen


def test_zero3_prefetches_the_next_unit():
    """When layer i's forward starts, it is whole and layer i+1's gather is already issued; when its
    backward starts (the hook registered after the optimizer's), layer i-1's is."""
    seen = spawn(2, prefetch_worker)[0]
    for states in seen["forward"]:
        assert states[0] == "whole" and all(s in ("gathering", "whole") for s in states[1:]), seen["forward"]
    for states in seen["backward"]:
        assert states[-1] == "whole" and all(s in ("gathering", "whole") for s in states), seen["backward"]
