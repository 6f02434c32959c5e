"""The planner: validation against Narayanan et al. 2021 Table 1, the search, the CLI."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.config import ConfigError
from megagpt.model_size import count_params
from megagpt.planner import (Cluster, Candidate, a100_selene, choose_layout, enumerate_layouts, flagship, gpt3_style,
                             gpt4plus_70b, narayanan2021_rows, paper_flops, predict, rank_layouts,
                             validate_narayanan2021)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def validation():
    return validate_narayanan2021()


def test_whole_table_within_15_percent(validation):
    """One global gemm_eff for every row, no per-row factor; every row of Table 1 is checked."""
    assert len(validation) == 10
    for r in validation:
        assert r["fits"], r
        assert abs(r["error"]) < 0.15, f"{r['params_b']}B: published {r['tflops']}, predicted {r['predicted']:.1f}"
    assert max(abs(r["error"]) for r in validation) < 0.08      # what it achieves today: 5.5%


def test_param_counts_match_the_paper(validation):
    """Within 1%, or within the rounding of the published figure (1.7B is 1.652B by the paper's
    own formula 12lh^2(1 + 13/12h + (V+s)/12lh), printed with two digits)."""
    for r in validation:
        tol = max(0.01 * r["params_b"], 0.05)
        assert abs(r["params_predicted_b"] - r["params_b"]) <= tol, r
    big = [r for r in validation if r["params_b"] >= 7]
    assert all(abs(r["params_predicted_b"] / r["params_b"] - 1) < 0.01 for r in big)


def test_executed_flops_equal_the_paper_formula():
    """With full recompute and no flash attention the model's FLOP count is Megatron's eq. (3)."""
    c = a100_selene()
    for row in narayanan2021_rows()[:6]:
        m = gpt3_style(row["hidden"], row["layers"], row["heads"])
        dp = row["gpus"] // (row["tp"] * row["pp"])
        L = Candidate(row["tp"], row["pp"], row["vp"], dp, row["micro_batch"], False, "full",
                      row["batch"] // (row["micro_batch"] * dp))
        p = predict(m, L, 2048, c, dtype="fp16", flash=False, distributed_optimizer=False)
        executed = p["hw_tflops_per_gpu"] * 1e12 * p["step_time_s"] * row["gpus"]
        assert executed == pytest.approx(paper_flops(m, row["batch"], 2048), rel=1e-9)


def test_time_model_directions():
    m, c = gpt4plus_70b(), Cluster()
    base = Candidate(8, 8, 1, 1, 1, True, "none", 16)
    t = lambda **kw: predict(m, dataclasses.replace(base, **kw), 4096, c)
    p = t()
    tb = p["time_breakdown"]
    per_mb = sum(tb[k] for k in ("compute", "memory_bound", "tp_comm", "recompute", "pp_p2p")) / 16
    assert tb["bubble"] == pytest.approx(7 * per_mb)                          # (pp - 1) / vp of a microbatch
    more = t(num_microbatches=64)          # same bubble in seconds, a quarter of the share
    assert more["time_breakdown"]["bubble"] == pytest.approx(tb["bubble"])
    assert more["time_breakdown"]["bubble"] / more["step_time_s"] < tb["bubble"] / p["step_time_s"] / 3
    full = t(recompute="full")
    assert full["time_breakdown"]["recompute"] > 0.25 * full["time_breakdown"]["compute"]
    assert full["memory_gb"] < p["memory_gb"]
    assert t(sp=False)["memory_gb"] > p["memory_gb"]
    assert p["mfu"] == pytest.approx(p["tflops_per_gpu"] / c.peak_tflops)
    assert p["tokens_per_s"] == pytest.approx(16 * 4096 / p["step_time_s"])


def test_interleaving_shrinks_the_bubble():
    m = gpt3_style(4096, 32, 32)
    c = Cluster()
    one = predict(m, Candidate(8, 4, 1, 1, 1, True, "none", 8), 2048, c)
    two = predict(m, Candidate(8, 4, 2, 1, 1, True, "none", 8), 2048, c)
    assert two["time_breakdown"]["bubble"] < 0.6 * one["time_breakdown"]["bubble"]
    assert two["memory_breakdown"]["activations"] > one["memory_breakdown"]["activations"]


def test_enumeration_respects_the_rules():
    m = gpt4plus_70b()
    layouts = list(enumerate_layouts(m, 512, 8192, 1024, Cluster()))
    assert layouts
    for L in layouts:
        assert L.tp * L.cp * L.pp * L.dp == 512 and m.num_heads % L.tp == 0 and 8 % L.tp == 0
        assert L.micro_batch * L.num_microbatches * L.dp == 1024
        assert L.vp == 1 or (L.pp > 1 and m.num_layers >= L.pp * L.vp)   # uneven chunks are balanced
        assert L.pp == 1 or L.num_microbatches >= L.pp
        assert not (L.sp and L.tp == 1)


def test_choose_layout_70b():
    m = gpt4plus_70b()
    assert count_params(m) == pytest.approx(70.3e9, rel=0.01)
    best = choose_layout(m, 64, 8192, 1024)
    assert best["fits"] and best["memory_gb"] <= 0.9 * 80
    assert 0.3 < best["mfu"] < 0.75
    fits, _ = rank_layouts(m, 64, 8192, 1024)
    assert [p["step_time_s"] for p in fits] == sorted(p["step_time_s"] for p in fits)
    assert not choose_layout(m, 8, 8192, 1024)["fits"]   # 70B x 18 bytes cannot fit 8 x 80 GiB
    with pytest.raises(ConfigError, match=r"^model.num_heads: 80 is not divisible by parallel.tp=3$"):
        rank_layouts(m, 64, 8192, 1024, tp=3)


def test_flagship_table():
    rows = flagship()
    assert [(r["gpus"], r["seq_len"]) for r in rows] == [(g, s) for s in (8192, 32768) for g in (8, 64, 512, 1024)]
    assert not rows[0]["fits"] and all(r["fits"] for r in rows if r["gpus"] >= 64)


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_json_ranking():
    r = run_cli("--gpus", "64", "--seq-len", "4096", "--global-batch", "512", "--json", "--top", "3", "--explain")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["gpus"] == 64 and len(out["ranking"]) == 3
    keys = {"tp", "pp", "vp", "dp", "sp", "recompute", "micro_batch", "memory_gb", "tflops_per_gpu", "mfu",
            "step_time_s", "memory_breakdown"}
    assert all(keys <= set(p) for p in out["ranking"])
    assert "step time" in r.stdout and "memory per GPU" in r.stdout


def test_cli_refuses_a_fixed_layout_that_does_not_fit():
    r = run_cli("--gpus", "8", "--tp", "8", "--pp", "1", "--vp", "1")
    assert r.returncode == 1 and "REFUSED" in r.stdout and "optimizer" in r.stdout


def test_cli_bad_argument_is_one_line():
    r = run_cli("--gpus", "64", "--tp", "3")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "parallel.tp=3" in r.stderr


# ----------------------------------------------------------------------------- context parallelism

@pytest.mark.parametrize("gpus", [512, 1024])
def test_planner_70b_at_32k_with_cp(gpus):
    """The flagship at 32k, 8M tokens per batch: with CP in the search the best layout uses CP, fits 80 GB
    and beats the best cp = 1 layout (which needs full recompute) by 8 MFU points or more. The issue's
    ">= 50%" holds only with attention at the GEMMs' efficiency (an FA3-class kernel); with the
    flash-attn 2 kernels the ring calls (35% of an H100's peak, Cluster.attn_eff) it is about 43%."""
    m, s, gb = gpt4plus_70b(), 32768, 256
    best = choose_layout(m, gpus, s, gb)
    assert best["fits"] and best["memory_gb"] <= 0.9 * 80 and best["cp"] > 1, best
    no_cp = rank_layouts(m, gpus, s, gb, cp=1)[0][0]
    assert no_cp["cp"] == 1 and no_cp["recompute"] == "full" and best["mfu"] >= no_cp["mfu"] + 0.08, (best, no_cp)
    fast = Cluster(attn_eff=Cluster().gemm_eff)
    assert Cluster().attn_eff < fast.attn_eff and choose_layout(m, gpus, s, gb, fast)["mfu"] >= 0.50


def test_planner_cp_ring_cost():
    """The ring's time terms: a hop leaving the node gets one NIC (p2p, not a collective ring), exposed
    only beyond its block's compute; the online-softmax merges and fp32 accumulations are memory-bound
    time that grows with cp - 1."""
    from megagpt.planner import _layer_costs, _p2p_ring_bw, _ring_bw
    c = Cluster()
    nic = c.network_gbps / 8 * 1e9 * c.link_eff
    assert _p2p_ring_bw(c, 4, 2) == c.nvlink_gbps / 2 * 1e9 * c.link_eff          # 8 GPUs: one node
    assert _p2p_ring_bw(c, 16, 2) == nic < _ring_bw(c, 16, 2)                      # 4 nodes: one NIC per hop
    m, s, kv = gpt4plus_70b(), 32768, 2 * (32768 // 16) * 4 * 128 * 2     # one K/V block: 2 x tok x kv_r x d, bf16
    for cl in (c, Cluster(attn_eff=c.gemm_eff)):                          # the hop hidden (0.35) / exposed (0.7)
        cost = {cp: _layer_costs(m, Candidate(2, 4, 1, 1, 1, True, "none", 1, cp=cp), s, 2, True, cl)
                for cp in (4, 16)}
        assert cost[4]["cp_fwd"] == 0.0                                   # an NVLink hop hides behind its block
        assert cost[16]["cp_fwd"] == pytest.approx(15 * max(0.0, kv / nic + 1e-5 - cost[16]["attn"] / 16))
        assert cost[16]["cp_mem_fwd"] / cost[4]["cp_mem_fwd"] == pytest.approx(15 / 3 * 4 / 16)
    assert cost[16]["cp_fwd"] > 0.0


def test_planner_tp_backward_overlap():
    """parallel/tp_overlap.py runs the QKV and fc1 input-gradient collectives during their weight-gradient
    GEMMs: for the 70B at tp 4 those GEMMs are longer than the collectives, so 2 of a layer's 8 TP
    collectives are hidden; on a slow link (collective longer than the GEMM) only the GEMM's time is."""
    from megagpt.planner import Candidate, _layer_costs
    m, s = gpt4plus_70b(), 8192
    L = Candidate(tp=4, cp=1, pp=1, vp=1, dp=1, ep=1, sp=True, recompute="none", micro_batch=1, num_microbatches=1)
    lc = _layer_costs(m, L, s, 2, True, Cluster())
    assert lc["comm_hidden"] == pytest.approx(2 * lc["comm"] / 4)
    slow = _layer_costs(m, L, s, 2, True, Cluster(nvlink_gbps=1.0))
    assert 0 < slow["comm_hidden"] < 2 * slow["comm"] / 4
