"""Exact resume of PP2 x DP2 with interleaving (vp 2) and the distributed optimizer, after a rank is
SIGKILLed in the middle of a save (megagpt/faults.py): during a shard's write (its file cut in half),
between publish's renames, and between the renames of a re-publish. Each time the last good checkpoint
(the one `latest` names) loads, and the losses after it are bit-identical to an uninterrupted run.

4 forked ranks, 4 steps of a tiny model with dropout (the RNG streams must resume too), saves every 2;
the kills hit the save of step 4, so every resumed run starts from step 2 and must log steps 3 and 4
exactly as the uninterrupted run did.
"""
import json
import os

import pytest

from dist import RankError, spawn
from megagpt.checkpoint.store import MANIFEST
from test_train_e2e import SMALL, TINY, _cli

STEPS = 4
ARGS = ["--config", TINY, *SMALL, "model.num_layers=4", "--pp", "2", "--vp", "2", "--train-iters", str(STEPS),
        "--save-interval", "2", "train.eval_interval=0", "train.global_batch_size=8",
        "parallel.distributed_optimizer=true", "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]


def _train(run_dir, fault=None, load=True):
    """One run on 4 forked ranks; with a fault, it must die. Returns the losses it logged."""
    before = len(_records(run_dir))
    argv = ARGS + ["--run-dir", str(run_dir)] + (["--load", str(run_dir)] if load else [])
    if fault is None:
        spawn(4, _cli, argv, timeout=240)
    else:
        os.environ["MEGAGPT_FAULT"] = fault                # the forked ranks inherit it
        try:
            with pytest.raises(RankError):                # the killed rank, or a peer that lost it
                spawn(4, _cli, argv, timeout=240)
        finally:
            del os.environ["MEGAGPT_FAULT"]
    return {r["step"]: r["loss"] for r in _records(run_dir)[before:] if "loss" in r}


def _records(run_dir) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _latest(run_dir) -> str:
    return (run_dir / "latest").read_text().strip()


def test_kills_during_saves_then_exact_resume(tmp_path):
    reference = _train(tmp_path / "full", load=False)
    assert sorted(reference) == list(range(1, STEPS + 1))
    run = tmp_path / "run"

    def resumed_exactly(losses):                          # every run below resumes from step 2
        assert sorted(losses) == [3, 4] and all(losses[s] == reference[s] for s in losses), (losses, reference)

    # 1. rank 1 dies halfway through writing its tensor file of step 4
    _train(run, "shard:4@1", load=False)
    assert _latest(run) == "step_00000002" and not (run / "step_00000004").exists()
    [tmp] = [n for n in os.listdir(run) if n.startswith("step_00000004.tmp-")]
    cut = os.path.getsize(run / tmp / "rank_00001.safetensors")
    assert cut == os.path.getsize(run / "step_00000002" / "rank_00001.safetensors") // 2
    # 2. resumed; rank 0 dies in publish: step 4 renamed into place, `latest` still names step 2
    resumed_exactly(_train(run, "publish:4"))
    assert _latest(run) == "step_00000002" and (run / "step_00000004" / MANIFEST).exists()
    assert not (run / tmp).exists(), "the killed save's tmp directory is cleaned by the next save"
    # 3. resumed from step 2 again; re-saving step 4 dies with the old copy set aside, the new not in place
    resumed_exactly(_train(run, "republish:4"))
    names = os.listdir(run)
    assert _latest(run) == "step_00000002" and "step_00000004" not in names, names
    assert any(n.startswith("step_00000004.old-") for n in names) and any(".tmp-" in n for n in names), names
    # 4. resumed without a fault: exact, published, nothing left behind
    resumed_exactly(_train(run))
    assert _latest(run) == "step_00000004" and (run / "step_00000004" / MANIFEST).exists()
    leftovers = [n for n in os.listdir(run) if ".tmp-" in n or ".old-" in n]
    assert not leftovers, leftovers
