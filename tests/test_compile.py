"""train.compile: true (torch.compile of each block's forward) against the eager model, same weights and
data: the first step's gradients (each rank's owned shard, before any update) and every step's loss
and grad norm to 1e-5 relative in fp32 (inductor reorders floating-point sums, so not bit for bit;
weights after Adam steps are not compared: Adam turns a rounding-level gradient of a near-zero element
into a whole lr-sized step, either sign). One layout, to keep it short: DP2 with ZeRO-1's parameter
gather overlapped with the forward (its waits move onto the compiled block), against eager in one process. Skipped where inductor
cannot run (no C++ compiler). Plus the one-line refusals."""
import contextlib
import io
import os

import pytest
import torch

from dist import assert_close_rel, spawn
from megagpt.config import ConfigError, ModelConfig, TrainConfig, config_from_dict
from megagpt.model.compile import compile_problem

MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=256,
             max_seq_len=32, tie_embeddings=False)
TRAIN = dict(seq_len=32, micro_batch_size=2, global_batch_size=4, train_iters=3, eval_interval=0, warmup=0,
             lr=1e-2)
STEPS = 3

needs_inductor = pytest.mark.skipif(compile_problem(ModelConfig(), TrainConfig())
                                    is not None, reason="inductor cannot compile here (no C++ compiler)")


def _worker(rank, world, compile_on, parallel=None):
    from megagpt.train import Trainer
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = config_from_dict({"model": MODEL, "parallel": parallel or {}, "train": {**TRAIN, "compile": compile_on}},
                           world)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, run_dir=os.devnull)
    update, grads = trainer.optimizer.update, {}
    adam = update.step

    def step(lr, n):                    # the reduced (and clipped) owned gradients of step 1
        if n == 1:
            grads.update({s.name: (s.lo, g.clone()) for s, g in zip(update.segments, update.grads)})
        return adam(lr, n)
    update.step = step
    recs = [trainer.train_step() for _ in range(STEPS)]
    return {"losses": torch.tensor([r["loss"] for r in recs]), "norms": torch.tensor([r["grad_norm"] for r in recs]),
            "grads": grads,
            "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
            "overlap": trainer.optimizer.overlap}


@needs_inductor
def test_compile_dp2_overlap_matches_eager_one_process():
    world = 2
    eager = spawn(1, _worker, False, timeout=300)[0]
    assert eager["graphs"] == 0
    seen = set()
    for r in spawn(world, _worker, True, timeout=600):
        assert r["graphs"] >= 1, "nothing was compiled"
        assert r["overlap"] == (world > 1)
        assert_close_rel(r["losses"], eager["losses"], name="losses")
        assert_close_rel(r["norms"], eager["norms"], name="grad norms")
        for n, (lo, g) in r["grads"].items():          # each DP rank's owned shard
            assert_close_rel(g, eager["grads"][n][1][lo:lo + g.numel()], name=n)
            seen.add(n)
    assert seen == set(eager["grads"])
    assert not torch.equal(eager["losses"][0], eager["losses"][-1])     # it trained


@needs_inductor
@pytest.mark.parametrize("parallel", [{"tp": 2}, {"pp": 2}], ids=["tp2", "pp2"])
def test_compile_matches_eager_in_the_same_layout(parallel):
    """TP2 (collectives inside the compiled blocks) and PP2 (the blocks of each stage): compiled against
    eager in the same layout, each rank's owned gradients of step 1 and every step's loss and grad norm.
    Eager in these layouts equals one process (tests/test_grads_measured.py), so compiled does too."""
    eager = spawn(2, _worker, False, parallel, timeout=300)
    for r, e in zip(spawn(2, _worker, True, parallel, timeout=600), eager):
        assert r["graphs"] >= 1 and e["graphs"] == 0
        assert_close_rel(r["losses"], e["losses"], name="losses")
        assert_close_rel(r["norms"], e["norms"], name="grad norms")
        assert set(r["grads"]) == set(e["grads"]) and r["grads"]
        for n, (lo, g) in r["grads"].items():
            assert lo == e["grads"][n][0]
            assert_close_rel(g, e["grads"][n][1], name=n)
    assert not torch.equal(eager[0]["losses"][0], eager[0]["losses"][-1])     # it trained


@pytest.mark.parametrize("over,msg", [({"model": {"hidden_dropout": 0.1}}, "model.hidden_dropout = 0"),
                                      ({"train": {"recompute": "full"}}, "train.recompute: none")])
def test_compile_refusals(over, msg):
    raw = {"model": {**MODEL, **over.get("model", {})}, "train": {**TRAIN, "compile": True, **over.get("train", {})}}
    with pytest.raises(ConfigError, match=msg) as e:
        config_from_dict(raw, 1)
    assert "\n" not in str(e.value)
