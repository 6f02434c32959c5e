"""The dry run builds on the meta device and its counts match real models and the flagship figures."""
import json
import subprocess
import sys

import torch

from dist import spawn
from megagpt.config import load_config
from megagpt.model_size import count_params
from megagpt.dryrun import dry_run, meta_rank_params, stage_chunks
from megagpt.model.gpt import GPTModel, build_model
from megagpt.parallel.state import ParallelState


def _dry(*args):
    out = subprocess.run([sys.executable, "examples/pretrain_70b.py", "--dry-run", "--json", *args],
                         capture_output=True, text=True, check=True)
    return out.stdout, json.loads(out.stdout.strip().splitlines()[-1])


def test_70b_default_and_seed():
    text, r = _dry()
    assert r["params_total"] == 70_308_464_640 and "params_total: 70308464640" in text
    assert len(r["params_per_rank"]) == r["layout"]["pp"]
    _, r = _dry("--config", "examples/configs/gpt4plus-seed.yaml", "--tp", "8", "--pp", "7", "--world-size", "56")
    assert r["params_total"] == 118_752_675_840
    # the stages hold every layer once
    assert sorted(i for ids in r["split"] for i in ids) == list(range(70))


def test_meta_allocates_nothing():
    cfg = load_config("examples/configs/gpt4plus-70b.yaml")
    ps = ParallelState.virtual(tp=8, pp=4)
    with torch.device("meta"):
        chunk = GPTModel(cfg.model, ps, layer_ids=[0, 1], device="meta")
    assert all(p.device.type == "meta" for p in chunk.parameters())


def test_tiny_counts_equal_real_parameters():
    cfg = load_config("examples/configs/tiny.yaml", ["parallel.pp=2"], world_size=2)
    real = sum(p.numel() for p in build_model(cfg.model).parameters())
    report = dry_run(cfg, 2)
    assert real == count_params(cfg.model) == report["params_total"] == sum(report["params_per_rank"])
    # each stage's meta count equals the stage built for real
    for r in range(2):
        ps = ParallelState.virtual(pp=2, pp_rank=r)
        n = sum(p.numel() for ids, pre, post in stage_chunks(cfg, r)
                for p in GPTModel(cfg.model, ps, layer_ids=ids, pre_process=pre, post_process=post).parameters())
        assert n == report["params_per_rank"][r]


def _local_count(rank, world, cfg):
    ps = ParallelState.create(tp=world)
    return sum(p.numel() for p in build_model(cfg, ps, sequence_parallel=True).parameters())


def test_tp_rank_counts_match_a_real_tp_model():
    cfg = load_config("examples/configs/tiny.yaml", ["parallel.tp=2", "model.num_kv_heads=1"], world_size=2)
    counts = spawn(2, _local_count, cfg.model)
    assert counts[0] == counts[1] == meta_rank_params(cfg, 0, 0) == meta_rank_params(cfg, 1, 0)
