"""One layout, one rule. For every layout of a grid on tiny.yaml and on the 70B flagship:
  - the config loader, the engine's validator (Layout.from_config) and the planner's enumeration
    accept the same layouts and refuse the others with the same one-line error;
  - the dry run (`--dry-run`: the model built on the meta device), the planner (the analytic memory
    model) and the model as built agree to the byte on the parameters of every pipeline rank.
The tiny model is built for real on the CPU (every TP rank's shard initialised), the 70B on the meta
device, both through `split.build_stage`, the builder training uses."""
import itertools
import json
import subprocess
import sys

import pytest
import torch

from megagpt.config import DTYPES, ConfigError, load_config
from megagpt.dryrun import dry_run
from megagpt.layout import Layout, rank_grid
from megagpt.parallel.state import ParallelState
from megagpt.pipeline.split import build_stage
from megagpt.planner import Cluster, enumerate_layouts, predict

TINY, B70 = "examples/configs/tiny.yaml", "examples/configs/gpt4plus-70b.yaml"
TINY_GRID = [(tp, pp, vp, dp, sp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4) for vp in (1, 2) for dp in (1, 2)
             for sp in ((False, True) if tp > 1 else (False,))]
B70_GRID = [(tp, pp, vp, 1024 // (tp * pp), True) for tp, pp, vp in
            ((8, 4, 1), (8, 4, 2), (8, 8, 1), (8, 8, 2), (4, 4, 8), (4, 8, 1), (2, 16, 1), (8, 16, 4),
             (16, 4, 1), (8, 16, 8), (32, 4, 1))]
MEMORY_KEYS = ("weights", "grads", "optimizer", "activations", "total")


def _config(path, tp, pp, vp, dp, sp):
    overrides = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vp={vp}",
                 f"parallel.sequence_parallel={str(sp).lower()}"]
    return load_config(path, overrides, world_size=tp * pp * dp)


def _planned(path, tp, pp, vp, dp, sp):
    """The planner's one candidate for this layout (its enumeration with every dimension fixed)."""
    cfg = load_config(path)
    t = cfg.train
    return list(enumerate_layouts(cfg.model, tp * pp * dp, t.seq_len, t.global_batch_size, Cluster(), tp=tp, cp=1,
                                  pp=pp, vp=vp, micro_batch=t.micro_batch_size, sp=sp, recompute=t.recompute))


def _built(cfg, pp_rank, tp_rank, device):
    """(parameters, bytes) of one rank's chunks as build_stage makes them."""
    p = cfg.parallel
    ps = ParallelState.virtual(tp=p.tp, pp=p.pp, tp_rank=tp_rank, pp_rank=pp_rank)
    ps.device = torch.device(device)         # "cpu": allocate and initialise; "meta": shapes only
    chunks = build_stage(cfg, ps, seed=3, dtype=DTYPES[cfg.train.dtype])
    params = [t for c in chunks for t in c.parameters()]
    assert all(t.device.type == device for t in params)
    return sum(t.numel() for t in params), sum(t.numel() * t.element_size() for t in params)


def _check(path, layout, device):
    tp, pp, vp, dp, sp = layout
    try:
        cfg = _config(path, *layout)
    except ConfigError as e:              # refused: the planner refuses it too, with the same words
        with pytest.raises(ConfigError) as planned:
            _planned(path, *layout)
        assert str(planned.value) == str(e) and "\n" not in str(e)
        return "refused"
    engine = Layout.from_config(cfg, tp * pp * dp)          # what Trainer and PipelineEngine read
    (candidate,) = _planned(path, *layout)
    assert (candidate.dp, candidate.num_microbatches) == (engine.dp, engine.num_microbatches)
    report = dry_run(cfg, tp * pp * dp)
    plan = predict(cfg.model, candidate, cfg.train.seq_len, Cluster(), dtype=cfg.train.dtype)
    mem, dry = plan["memory_breakdown"], report["bytes_per_rank"]
    built = [[_built(cfg, r, t, device) for t in sorted({0, tp - 1})] for r in range(pp)]
    params = [counts[0][0] for counts in built]
    assert all(len(set(counts)) == 1 for counts in built)   # every TP rank of a stage holds the same
    assert report["params_per_rank"] == params, (layout, report["params_per_rank"], params)
    assert mem["params_per_rank"] == dry["params_per_rank"] == params, (layout, mem["params_per_rank"], params)
    assert mem["params_on_rank"] == dry["params_on_rank"] == params[dry["pp_rank"]]
    assert dry["weights"] == built[dry["pp_rank"]][0][1]                 # bytes, as allocated
    for key in MEMORY_KEYS:                                             # GiB in the planner: exact (2^30)
        assert mem[key] * 2 ** 30 == dry[key], (layout, key)
    assert report["split"] == [ids for r in range(pp) for ids, _, _ in engine.stage_chunks(cfg.model, r)]
    return "agreed"


def test_tiny_grid_agrees_to_the_byte():
    outcome = [_check(TINY, layout, "cpu") for layout in TINY_GRID]
    assert outcome.count("agreed") >= 40 and outcome.count("refused") >= 8, outcome


def test_70b_agrees_to_the_byte_on_the_meta_device():
    outcome = [_check(B70, layout, "meta") for layout in B70_GRID]
    assert outcome == ["agreed"] * 9 + ["refused"] * 2, outcome   # 70 layers < 128 chunks; 80 heads over tp=32


def test_70b_dry_run_command_reports_the_planners_memory():
    """`--dry-run --json` as a user runs it, against the planner's prediction for the same layout."""
    out = subprocess.run([sys.executable, "examples/pretrain_70b.py", "--dry-run", "--json", "--tp", "8", "--pp", "4",
                          "--vp", "2", "--world-size", "1024"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    (candidate,) = _planned(B70, 8, 4, 2, 32, True)
    mem = predict(load_config(B70).model, candidate, 8192, Cluster())["memory_breakdown"]
    assert report["params_per_rank"] == mem["params_per_rank"]
    assert [report["bytes_per_rank"][k] for k in MEMORY_KEYS] == [mem[k] * 2 ** 30 for k in MEMORY_KEYS]


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "dp-tp-cp-ep-pp", "pp-dp-ep-cp-tp"])
def test_rank_coords_are_the_process_groups_grid(order):
    """Layout.rank_coords (converter, comm model) and rank_grid (ParallelState's groups) are one rule."""
    layout = Layout(tp=2, pp=3, world_size=24, order=order, global_batch=24)
    grid = rank_grid(24, layout.grid_sizes, order)
    for rank in range(24):
        coords = layout.rank_coords(rank)
        for axis, groups in grid.items():
            (group,) = [g for g in groups if rank in g]
            assert group.index(rank) == coords[axis], (rank, axis)


def test_mod_with_context_parallel_is_refused_in_one_line_and_moe_is_not():
    """MoE runs under CP (tests/test_moe_cp.py); mixture of depths' top-k needs the whole sequence."""
    load_config(TINY, ["parallel.cp=2", "model.moe_num_experts=4", "train.seq_len=64"], world_size=2)
    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["parallel.cp=2", "model.mod_layers=[0]", "train.seq_len=64"], world_size=2)
    assert str(e.value).startswith("parallel.cp: mixture of depths") and "parallel.cp=2" in str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the rules and derived figures, by hand

def _small(**kw):
    """MHA, 4 heads of 16, a 4h GELU MLP, 4 layers, vocab 97 (padded to 128 at tp=1)."""
    from megagpt.config import ModelConfig
    return ModelConfig(**(dict(vocab_size=97, max_seq_len=64, hidden_size=64, num_layers=4, num_heads=4,
                               ffn_hidden_size=256, mlp="gelu") | kw))


@pytest.mark.parametrize("layout, model, field", [
    (dict(order="tp-tp-ep-dp-pp"), {}, "parallel.order: expected a permutation"),             # an axis twice
    (dict(order="tp-cp-ep-dp-xx"), {}, "parallel.order: expected a permutation"),             # an unknown axis
    (dict(tp=4, world_size=4), dict(ffn_hidden_size=254), "model.ffn_hidden_size: 254 is not divisible"),
    (dict(tp=2, sp=True, world_size=2), dict(mod_layers=[0]), "parallel.sequence_parallel: mixture of depths"),
    (dict(tp=4, cp=2, sp=True, world_size=8, seq_len=12), {}, r"train.seq_len: 12/cp=6 is not divisible by parallel.tp=4"),
    (dict(ep=2, world_size=3, global_batch=3), dict(moe_num_experts=4), "parallel.ep: 2 does not divide dp=3"),
    (dict(ep=4, world_size=4, global_batch=4), dict(moe_num_experts=6), "parallel.ep: 4 does not divide model.moe_num"),
])
def test_validate_refuses_each_rule_by_name(layout, model, field):
    with pytest.raises(ConfigError) as e:
        Layout(**({"seq_len": 32} | layout)).validate(_small(**model))
    assert str(e.value).startswith(field.replace("\\", "")) and "\n" not in str(e.value), str(e.value)


def test_sequence_parallel_is_off_at_tp_1_and_the_rules_see_it_off():
    """As Megatron (and the config loader), SP at tp = 1 is switched off: nothing to shard over."""
    assert Layout(sp=True).sp is False and Layout(tp=2, sp=True).sp is True
    Layout(sp=True, seq_len=32).validate(_small(mod_layers=[0]))      # MoD refuses SP, but SP is off here


def test_seq_multiple_activation_shape_and_head_cost_by_hand():
    m = _small()
    assert [Layout(**kw).seq_multiple for kw in (dict(), dict(tp=4, sp=True), dict(cp=2), dict(cp=4),
                                                   dict(cp=2, tp=2, sp=True), dict(tp=4), dict(cp=2, tp=2))] \
        == [1, 4, 4, 8, 8, 1, 4]                  # without SP the sequence is not cut by tp
    # [s/(cp*tp), b, h] with SP, [s/cp, b, h] without
    assert Layout(tp=2, cp=2, sp=True, seq_len=64, micro_batch=3).activation_shape(m) == (16, 3, 64)
    assert Layout(tp=2, cp=2, sp=False, seq_len=64, micro_batch=3).activation_shape(m) == (32, 3, 64)
    # a layer at s=32: matmuls 2*(64*12*16 + 64*64 + 2*64*256) = 98304, causal attention 4*4*16*16 = 4096;
    # the head 2*64*V_padded: V = 97 pads to 128 at tp=1 (16384) and to 256 at tp=2 (32768)
    assert Layout(seq_len=32).head_cost(m) == pytest.approx(16384 / 102400)
    assert Layout(tp=2, seq_len=32).head_cost(m) == pytest.approx(32768 / 102400)


def test_default_world_is_one_replica_and_dp_is_ep_with_experts():
    cfg = load_config(None, ["model.moe_num_experts=4", "parallel.ep=2", "train.global_batch_size=2"])
    assert cfg.parallel.world_size is None
    layout = Layout.from_config(cfg)
    assert (layout.world_size, layout.dp, layout.grid_sizes["dp"]) == (2, 2, 1)


@pytest.mark.parametrize("order", ["tp-cp-ep-dp-pp", "tp-cp-dp-ep-pp", "dp-ep-tp-cp-pp", "pp-ep-cp-tp-dp"])
def test_rank_coords_with_experts_are_the_process_groups_grid(order):
    """With ep > 1 the grid's dp axis is edp = dp/ep: coords["edp"] is a rank's place in its edp group,
    coords["ep"] in its ep group, and coords["dp"] its place in the DP group, ep x edp in rank order
    (ParallelState's _merge of the two axes)."""
    from megagpt.parallel.state import _merge
    layout = Layout(tp=2, ep=2, pp=2, world_size=16, order=order, global_batch=8)
    assert layout.grid_sizes == {"tp": 2, "cp": 1, "ep": 2, "dp": 2, "pp": 2}
    grid = rank_grid(16, layout.grid_sizes, order)
    dp_groups = _merge(grid, ["ep", "dp"], 16)
    assert all(len(g) == 4 for g in dp_groups)
    for rank in range(16):
        coords = layout.rank_coords(rank)
        for axis, key in (("tp", "tp"), ("ep", "ep"), ("dp", "edp"), ("pp", "pp")):
            (group,) = [g for g in grid[axis] if rank in g]
            assert group.index(rank) == coords[key], (rank, axis)
        (group,) = [g for g in dp_groups if rank in g]
        assert sorted(group).index(rank) == coords["dp"], (rank, coords)


def test_rank_coords_with_experts_by_hand():
    """tp2 ep2 edp2 on 8 ranks. Order tp-cp-ep-dp-pp: rank = tp + 2*ep + 4*edp, the DP group of rank 0 is
    0, 2, 4, 6 and rank 6 (ep 1, edp 1) is its 4th. Order tp-cp-dp-ep-pp: rank = tp + 2*edp + 4*ep, so
    rank 4 (ep 1, edp 0) is the 3rd of 0, 2, 4, 6 and rank 2 (ep 0, edp 1) the 2nd."""
    a = Layout(tp=2, ep=2, world_size=8, global_batch=4)
    assert {k: a.rank_coords(6)[k] for k in ("tp", "ep", "edp", "dp")} == {"tp": 0, "ep": 1, "edp": 1, "dp": 3}
    assert {k: a.rank_coords(2)[k] for k in ("tp", "ep", "edp", "dp")} == {"tp": 0, "ep": 1, "edp": 0, "dp": 1}
    b = a.replace(order="tp-cp-dp-ep-pp")
    assert {k: b.rank_coords(4)[k] for k in ("tp", "ep", "edp", "dp")} == {"tp": 0, "ep": 1, "edp": 0, "dp": 2}
    assert {k: b.rank_coords(2)[k] for k in ("tp", "ep", "edp", "dp")} == {"tp": 0, "ep": 0, "edp": 1, "dp": 1}


def test_balanced_counts_against_brute_force():
    """Every chunk gets >= 1 layer and the costliest chunk is as cheap as any split allows, for LM heads of
    0.01 to 3 layers (a head just over a whole layer, 1.01, once left a chunk empty when the capacity's
    float rounding went down). Ties: spare layers go from the first chunk."""
    from megagpt.layout import balanced_counts
    assert balanced_counts(2, [0.0, 1.01]) == [1, 1]
    assert balanced_counts(5, [0.0, 0.0, 0.0, 1.01]) == [1, 1, 2, 1]
    for k in range(1, 301):
        head = k / 100
        for chunks in (2, 3, 4):
            for layers in range(chunks, 10):
                extra = [0.0] * (chunks - 1) + [head]
                got = balanced_counts(layers, extra)
                best = min(max(n + e for n, e in zip(split, extra))
                           for cuts in itertools.combinations(range(1, layers), chunks - 1)
                           for split in [[b - a for a, b in zip((0,) + cuts, cuts + (layers,))]])
                assert sum(got) == layers and min(got) >= 1, (head, layers, got)
                assert max(n + e for n, e in zip(got, extra)) == pytest.approx(best, abs=1e-9), (head, layers, got)
