"""One layout, one rule. For every layout of a grid on tiny.yaml and on the 70B flagship:
  - the config loader, the engine's validator (Layout.from_config) and the planner's enumeration
    accept the same layouts and refuse the others with the same one-line error;
  - the dry run (`--dry-run`: the model built on the meta device), the planner (the analytic memory
    model) and the model as built agree to the byte on the parameters of every pipeline rank.
The tiny model is built for real on the CPU (every TP rank's shard initialised), the 70B on the meta
device, both through `split.build_stage`, the builder training uses."""
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

