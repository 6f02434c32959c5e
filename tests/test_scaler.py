"""fp16 dynamic loss scaling: the scale's rules alone, then an inf injected on one DP rank."""
import torch

from dist import spawn
from megagpt.config import ParallelConfig
from megagpt.model.gpt import build_model
from megagpt.optim.lr import lr_at
from megagpt.optim.optimizer import build_optimizer
from megagpt.optim.scaler import LossScaler
from megagpt.parallel.state import ParallelState
from test_optim_dp import GLOBAL_BATCH, MICRO, data, model_cfg, train_cfg


def test_scale_halves_on_inf_grows_after_window_and_stops_at_min():
    s = LossScaler(dynamic=True, initial_scale=8.0, window=3, min_scale=2.0)
    assert s.scale_loss(torch.tensor(1.5)).item() == 12.0
    s.update(found_inf=True)
    assert (s.scale, s.growth_tracker) == (4.0, 0)
    s.update(True)
    s.update(True)
    assert s.scale == 2.0, "never below min_loss_scale"
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0 and s.growth_tracker == 2
    s.update(False)
    assert s.scale == 4.0 and s.growth_tracker == 0, "x2 after loss_scale_window good steps"
    s.update(False)
    s.update(True)
    assert s.growth_tracker == 0 and s.scale == 2.0, "an overflow restarts the window"


def test_static_scaler_is_identity():
    s = LossScaler(dynamic=False, initial_scale=1024.0)
    loss = torch.tensor(3.0)
    assert s.scale_loss(loss) is loss and s.scale == 1.0
    s.update(True)
    assert s.scale == 1.0
    g = [torch.ones(3)]
    s.unscale_(g)
    assert torch.equal(g[0], torch.ones(3))


def fp16_worker(rank, world):
    mcfg = model_cfg()
    tcfg = train_cfg(world, dtype="fp16", initial_loss_scale=1024.0, loss_scale_window=2)
    ps = ParallelState.create()
    model = build_model(mcfg, ps, seed=tcfg.seed, dtype=torch.float16)
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(bucket_size_mb=0.05), mcfg)
    # the inf goes into rank 1's gradient at an element that DP rank 0 owns: rank 1 can only learn
    # of it through the MAX all-reduce over the world
    target = model.layers["1"].mlp.fc1.weight
    bucket = opt.buffer.bucket_of[id(target)]
    start, _ = opt.buffer.param_range[id(target)]
    n = (bucket.end - bucket.start) // world
    element = max(bucket.start, start) - start                  # first element of target in rank 0's shard
    assert max(bucket.start, start) < bucket.start + n, "pick a param that starts inside rank 0's shard"
    inject = {"on": False}

    def poison(g):
        if inject["on"] and rank == 1:
            g = g.clone()
            g.view(-1)[element] = float("inf")
        return g
    target.register_hook(poison)

    out = []
    for step in range(4):
        inject["on"] = step == 1
        tokens, labels = data(mcfg)[step]
        rows = GLOBAL_BATCH // world
        mine = slice(rank * rows, (rank + 1) * rows)
        opt.zero_grad()
        for i, (t, lab) in enumerate(zip(tokens[mine].chunk(MICRO), labels[mine].chunk(MICRO))):
            opt.set_sync(i == MICRO - 1)
            opt.scale_loss(model(t, lab).sum() / tokens.numel()).backward()
        before = [p.detach().clone() for p in model.parameters()]
        main_before = opt.update.main_flat.clone()
        moments_before = opt.update.exp_avg.clone()
        stats = opt.step(lr_at(step, tcfg))
        opt.finish_param_sync()
        own_finite = all(torch.isfinite(v).all() for v in opt.owned)
        out.append({"stats": stats, "own_finite": bool(own_finite), "steps": opt.steps,
                    "params_same": all(torch.equal(a, p) for a, p in zip(before, model.parameters())),
                    "main_same": torch.equal(main_before, opt.update.main_flat),
                    "moments_same": torch.equal(moments_before, opt.update.exp_avg)})
    return out


def test_inf_on_one_rank_skips_the_step_everywhere():
    res = spawn(2, fp16_worker)
    for rank, steps in enumerate(res):
        clean0, poisoned, clean2, clean3 = steps
        assert not clean0["stats"]["skipped"] and clean0["stats"]["loss_scale"] == 1024.0
        assert not clean0["params_same"], "a clean step updates the weights"
        assert poisoned["stats"]["skipped"], f"rank {rank} did not skip"
        assert poisoned["stats"]["loss_scale"] == 512.0
        assert poisoned["params_same"] and poisoned["main_same"] and poisoned["moments_same"]
        assert poisoned["steps"] == 1, "a skipped step is not counted for Adam's bias correction"
        assert not clean2["stats"]["skipped"] and not clean2["params_same"]
        assert clean3["stats"]["loss_scale"] == 1024.0, "x2 after loss_scale_window=2 good steps"
    assert res[1][1]["own_finite"], "the inf sits in rank 0's shard: rank 1 sees it through the all-reduce only"
    assert not res[0][1]["own_finite"]
