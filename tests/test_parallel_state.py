"""Process groups from one order string, and the fork harness's failure modes."""
import time

import pytest
import torch
import torch.distributed as dist

from dist import RankError, spawn
from megagpt.parallel.state import ParallelState, rank_grid


def test_rank_grid_tp_adjacent_and_complete():
    g = rank_grid(16, {"tp": 2, "dp": 2, "pp": 4}, "tp-cp-ep-dp-pp")
    assert g["tp"][:2] == [[0, 1], [2, 3]]            # TP ranks adjacent: they share a node
    assert g["dp"][0] == [0, 2]
    assert g["pp"][0] == [0, 4, 8, 12]
    for axis, size in (("tp", 2), ("dp", 2), ("pp", 4)):
        flat = sorted(r for grp in g[axis] for r in grp)
        assert flat == list(range(16)) and all(len(grp) == size for grp in g[axis])
    # another order puts DP innermost
    assert rank_grid(4, {"tp": 2, "dp": 2}, "dp-tp-cp-ep-pp")["dp"][0] == [0, 1]
    with pytest.raises(ValueError, match="world size is 6"):
        rank_grid(6, {"tp": 4}, "tp-cp-ep-dp-pp")


def _groups(rank, world):
    ps = ParallelState.create(tp=2, pp=2)
    t = torch.tensor([float(rank)])
    ps.tp.all_reduce(t)
    return {"tp": ps.tp.ranks, "pp": ps.pp.ranks, "dp": ps.dp.ranks, "emb": ps.embedding.ranks,
            "sum": t, "counted": ps.counter.summary()}


def test_parallel_state_groups_on_8_ranks():
    out = spawn(8, _groups)
    assert out[5]["tp"] == [4, 5] and out[5]["pp"] == [1, 5] and out[5]["dp"] == [5, 7]
    assert out[3]["emb"] == [3, 7]                      # first and last stage of its pipeline
    assert out[5]["sum"].item() == 9.0
    assert out[5]["counted"] == {"tp/all_reduce": 4}


def _gather_scatter(rank, world):
    import warnings
    warnings.simplefilter("error")                      # torch's deprecation of the old names fails here
    g = ParallelState.create().dp
    g.sp_reduce = "reduce_scatter"                      # the real reduce-scatter, not gloo's all-reduce form
    t = torch.arange(4.0) + 10 * rank                   # [4]
    out = {"gather": g.all_gather(t), "scatter": g.reduce_scatter(t)}
    flat = torch.empty(8)
    g.all_gather_async(flat, t).wait()
    half = torch.empty(2)
    g.reduce_scatter_async(half, t).wait()
    return {**out, "gather_async": flat, "scatter_async": half}


def test_group_gather_and_scatter_values_without_deprecation_warnings():
    out = spawn(2, _gather_scatter)
    both = torch.tensor([0.0, 1, 2, 3, 10, 11, 12, 13])
    summed = torch.tensor([10.0, 12, 14, 16])
    for r, o in enumerate(out):
        assert torch.equal(o["gather"], both) and torch.equal(o["gather_async"], both)
        mine = summed[2 * r:2 * r + 2]
        assert torch.equal(o["scatter"], mine) and torch.equal(o["scatter_async"], mine)


def _fails(rank, world):
    if rank == 2:
        raise ValueError("rank two is broken")
    dist.barrier()


def _hangs(rank, world):
    if rank == 1:
        time.sleep(60)
    return rank


def test_harness_reports_the_failing_rank():
    t = time.time()
    with pytest.raises(RankError, match="rank two is broken") as e:
        spawn(4, _fails, timeout=30)
    assert "rank2" in str(e.value) and time.time() - t < 20


def test_harness_reports_a_hang_without_freezing():
    t = time.time()
    with pytest.raises(RankError, match=r"rank\(s\) \[1\] did not finish"):
        spawn(2, _hangs, timeout=3)
    assert time.time() - t < 15
