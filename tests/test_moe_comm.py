"""MoE in the communication, parameter and memory models.

Bytes: one real Trainer step per case (test_comm_accounting's harness: every torch.distributed call
is also intercepted and must equal the counter). Every (kind, group) of every rank equals
comm_model's prediction exactly. The all-to-all's rows depend on where the router sends the tokens
(and, with a capacity factor, on how many it keeps): given each rank's rows from its MoE context it
is exact per rank; without them the dropless model's world sum is exact for dropless cases.
Cases cover the expert-data-parallel group (ep2 of dp4: edp 2, ZeRO-1 and DDP), capacity drops with
ep > 1, and context parallelism (counts and capacity gathers over cp, experts reduced over edp x cp).
Counts: chunk_param_numels equals the meta-device model for MoE/MoD configs at any ep; the dry run
reports total and active parameters.
"""
import pytest
import torch

from dist import spawn
from megagpt.comm_model import _chunk_param_numels, expected_comm_bytes
from megagpt.config import config_from_dict
from megagpt.model_size import active_params, count_params
from megagpt.model.gpt import GPTModel
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.split import stage_chunks
from test_comm_accounting import _one_step, raw_config

MOE = dict(moe_num_experts=4, moe_top_k=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01)
CASES = {
    "ep2-dp2-bias": (2, raw_config(model=dict(MOE, moe_router_bias_rate=0.01), parallel=dict(ep=2), dp=2)),
    "ep2-dp2-plain-shared": (2, raw_config(model=dict(MOE, moe_layer_freq=2, moe_shared_expert_size=32),
                                           parallel=dict(ep=2, distributed_optimizer=False), dp=2)),
    "tp2-sp-capacity": (2, raw_config(model=dict(MOE, moe_capacity_factor=1.0), parallel=dict(tp=2, sequence_parallel=True))),
    "ep2-tp2-sp-pp2": (8, raw_config(model=dict(MOE, num_layers=4, moe_layers=[1, 2]),
                                     parallel=dict(ep=2, tp=2, pp=2, sequence_parallel=True), dp=2)),
    # dp 4, ep 2: each expert on edp = 2 ranks, whose buckets reduce-scatter / all-reduce over "edp"
    "ep2-dp4-edp2-zero1": (4, raw_config(model=MOE, parallel=dict(ep=2), dp=4)),
    "ep2-dp4-edp2-ddp": (4, raw_config(model=MOE, parallel=dict(ep=2, distributed_optimizer=False), dp=4)),
    "ep2-dp2-capacity": (2, raw_config(model=dict(MOE, moe_capacity_factor=0.5), parallel=dict(ep=2), dp=2)),
    "ep2-cp2-capacity": (4, raw_config(model=dict(MOE, moe_capacity_factor=0.5), parallel=dict(ep=2, cp=2), dp=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_bytes_equal_the_model(case, tmp_path):
    world, raw = CASES[case]
    cfg = config_from_dict(raw, world)
    results = spawn(world, _one_step, raw, str(tmp_path), True, timeout=300)
    rows = [n for _, n in results]
    a2a = ("all_to_all", "ep")
    total = 0
    for rank, (records, _) in enumerate(results):
        measured = {(kind, group): n for kind, group, n in records}
        expected = expected_comm_bytes(cfg, world, rank=rank, backend="gloo", moe_rows=rows)
        total += measured.get(a2a, 0)
        assert measured == expected, f"{case}, rank {rank}:\n measured {measured}\n expected {expected}"
    if "edp2" in case or "cp2" in case:      # the expert buckets' own group carried bytes
        assert any(group == "edp" for records, _ in results for _, group, n in records if n)
    assert (total > 0) == (cfg.parallel.ep > 1)
    dropless = expected_comm_bytes(cfg, world, backend="gloo").get(a2a, 0)   # the model without measured rows
    if cfg.model.moe_capacity_factor is None:
        assert total == dropless
    elif cfg.parallel.ep > 1:                                                 # drops: fewer rows than dropless
        assert total < dropless


@pytest.mark.parametrize("over, ep", [(dict(MOE, moe_layers=[1]), 1), (dict(MOE, moe_shared_expert_size=16), 2),
                                      (dict(MOE, mod_layers=[0, 1], moe_layer_freq=2), 4)])
def test_param_counts_match_the_meta_model(over, ep):
    raw = raw_config(model=dict(over, num_layers=2), parallel=dict(ep=ep), dp=ep)
    cfg = config_from_dict(raw, ep)
    ps = ParallelState.virtual(ep=ep)
    for ids, pre, post in stage_chunks(cfg, 0):
        model = GPTModel(cfg.model, ps, layer_ids=ids, pre_process=pre, post_process=post, device=torch.device("meta"))
        assert _chunk_param_numels(cfg, ids, pre, post) == [t.numel() for t in model.parameters()]
        kinds = [x for _, x in _chunk_param_numels(cfg, ids, pre, post, kinds=True)]
        assert kinds == [bool(getattr(t, "meta", None) and t.meta.expert) for t in model.parameters()]
    m = cfg.model
    full = GPTModel(m, ParallelState.virtual(), device=torch.device("meta"))
    experts = sum(t.numel() for t in full.parameters() if t.meta.expert)
    assert count_params(m) == sum(t.numel() for t in full.parameters())
    assert active_params(m) == count_params(m) - experts + experts * m.moe_top_k // m.moe_num_experts


def test_moe_flagship_plans_with_expert_parallelism():
    """gpt4plus-moe.yaml: the planner (tp4 pp8 fixed, to keep the search short) puts it on 1,024 H100s with
    ep > 1; the dry run counts total and active parameters, and its meta-device count of a rank equals the
    memory model's (experts split over ep)."""
    import os
    from megagpt.config import load_config
    from megagpt.dryrun import dry_run
    from megagpt.layout import Layout
    from megagpt.memory import params_per_rank
    from megagpt.planner import rank_layouts
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "gpt4plus-moe.yaml")
    cfg = load_config(path)
    fits, _ = rank_layouts(cfg.model, 1024, cfg.train.seq_len, cfg.train.global_batch_size, tp=4, pp=8, vp=1)
    best = fits[0]
    assert best["fits"] and best["ep"] > 1
    cfg = load_config(path, ["parallel.tp=4", "parallel.pp=8", f"parallel.ep={best['ep']}"], world_size=1024)
    report = dry_run(cfg, 1024)
    assert report["params_total"] == count_params(cfg.model) > 3 * report["params_active"]
    assert report["params_active"] == active_params(cfg.model)
    assert report["params_per_rank"] == params_per_rank(cfg.model, Layout.from_config(cfg, 1024))
