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
    assert max(abs(r["error"]) for r in validation) < 0.08      # what it achieves today: 6.2%


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
    assert len(set(layouts)) == len(layouts)                 # no layout twice (SP on at tp = 1 is SP off)
    assert {L.vp for L in layouts} == {1, 2, 4, 8, 16} and {L.cp for L in layouts} == {1, 2, 4, 8, 16}
    moe = list(enumerate_layouts(dataclasses.replace(m, moe_num_experts=4), 8, 8192, 64, Cluster(), tp=1, pp=1))
    assert {L.ep for L in moe} == {1, 2, 4}                  # ep up to the number of experts


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


# ----------------------------------------------------------------------------- the time model's terms, by hand

def _round_cluster(**kw):
    """Round numbers: matmuls at 1 TFLOP/s, flash attention at 0.5, 1 TB/s of HBM, 1 TB/s per direction of
    NVLink, 100 GB/s per NIC, no latency."""
    return Cluster(**(dict(peak_tflops=1.0, gemm_eff=1.0, attn_eff=0.5, hbm_tbps=1.0, mem_eff=1.0, nvlink_gbps=2000.0,
                           network_gbps=800.0, link_eff=1.0, latency_us=0.0) | kw))


def _small(**kw):
    """h 64, 4 heads of 16 (MHA), a 4h GELU MLP, 4 layers, vocab 128 (no padding up to tp=2)."""
    from megagpt.config import ModelConfig
    return ModelConfig(**(dict(vocab_size=128, make_vocab_divisible_by=64, max_seq_len=64, hidden_size=64, num_layers=4,
                               num_heads=4, ffn_hidden_size=256, mlp="gelu", norm="layernorm") | kw))


def test_ring_bandwidths_by_hand():
    """Default H100 node: NVLink 450 GB/s per direction x 0.8; a NIC 50 GB/s x 0.8."""
    from megagpt.planner import _ring_bw
    c = Cluster()
    assert _ring_bw(c, 8, 1) == _ring_bw(c, 4, 2) == pytest.approx(360e9)      # a whole node is still NVLink
    assert _ring_bw(c, 16, 1) == pytest.approx(8 * 40e9)                        # two nodes: 8 NICs a node
    assert _ring_bw(c, 2, 8) == pytest.approx(40e9)                             # one member a node: one NIC


def test_layer_costs_by_hand():
    """tp 2, s 64, b 1, bf16, flash: per rank 2 heads, 64 tokens.
    matmuls 64 x 2*(64*6*16 + 2*16*64 + 2*64*256/2) = 3,145,728 FLOPs; causal attention 64 x 4*2*16*32 = 262,144
    FLOPs at half the rate; memory-bound bytes: replicated 64 x 10*2*64 (halved by SP) plus sharded
    64 x 2*(2*4*16 + 2*256/2) (GELU; SwiGLU 3*256/2); TP: 4 collectives of 64*64*2/2 bytes, the QKV and fc1
    ones hidden behind their (longer) weight-gradient GEMMs."""
    from megagpt.planner import _layer_costs
    c, m = _round_cluster(), _small()
    L = Candidate(tp=2, pp=1, vp=1, dp=1, micro_batch=1, sp=True, recompute="none", num_microbatches=1)
    lc = _layer_costs(m, L, 64, 2, True, c)
    assert lc["gemm"] == pytest.approx(3145728e-12) and lc["attn"] == pytest.approx(2 * 262144e-12)
    assert lc["mem"] == pytest.approx((40960 + 49152) * 1e-12) and lc["core_mem"] == 0.0
    assert lc["comm"] == pytest.approx(4 * 4096e-12) and lc["comm_hidden"] == pytest.approx(2 * 4096e-12)
    off = _layer_costs(m, dataclasses.replace(L, sp=False), 64, 2, True, c)
    assert off["mem"] == pytest.approx((81920 + 49152) * 1e-12)
    swiglu = _layer_costs(_small(mlp="swiglu"), L, 64, 2, True, c)
    assert swiglu["mem"] == pytest.approx((40960 + 65536) * 1e-12)


def test_planner_ring_bytes_are_the_comm_models():
    """With attention too fast to hide anything, the ring's exposed time is comm_model.cp_ring_bytes over
    the link ((cp-1) K/V blocks forward; (cp-1) K/V blocks and cp fp32 dK/dV blocks backward); with slow
    attention only the last dK/dV hop shows: one [2, 1, 16, 4, 16] block in fp32, 8192 bytes. The fp32
    accumulations of the backward (dq and dK/dV, 18 bytes an element, cp steps) cover the whole
    sequence's q and K/V once, whatever cp: 64 x (64 + 128) x 18 bytes."""
    from megagpt.comm_model import cp_ring_bytes
    from megagpt.planner import _layer_costs
    m = _small()
    for cp in (2, 4):
        L = Candidate(tp=1, pp=1, vp=1, dp=1, micro_batch=1, sp=False, recompute="none", num_microbatches=1, cp=cp)
        fwd, bwd = cp_ring_bytes(L.layout(64), m, 2)
        fast = _layer_costs(m, L, 64, 2, True, _round_cluster(attn_eff=1e9))
        assert fast["cp_fwd"] == pytest.approx(fwd * 1e-12, rel=1e-6)
        assert fast["cp_bwd"] == pytest.approx(bwd * 1e-12, rel=1e-6)
        assert fast["cp_mem_bwd"] == pytest.approx(64 * 192 * 18e-12)
        slow = _layer_costs(m, L, 64, 2, True, _round_cluster(attn_eff=1e-9))
        assert slow["cp_fwd"] == 0.0
        if cp == 4:
            assert slow["cp_bwd"] == pytest.approx(8192e-12)


def test_expert_all_to_alls_by_hand():
    """top 2 of 4 experts, s 64, b 1, h 64, bf16: 128 rows of 128 bytes; per MoE layer 2 all-to-alls forward,
    (ep-1)/ep of the rows leaving the rank; a layer's share is the share of MoE layers."""
    from megagpt.planner import _layer_costs
    c = _round_cluster()
    for ep, moe_layers, expected in ((2, None, 2 * 8192), (4, None, 2 * 12288), (2, [0, 1], 8192)):
        m = _small(moe_num_experts=4, moe_top_k=2, moe_layers=moe_layers)
        L = Candidate(tp=1, pp=1, vp=1, dp=ep, micro_batch=1, sp=False, recompute="none", num_microbatches=1, ep=ep)
        assert _layer_costs(m, L, 64, 2, True, c)["comm"] == pytest.approx(expected * 1e-12), (ep, moe_layers)


def test_step_time_by_hand():
    """tp 2 (SP), pp 2 (2 layers a stage), dp 2, 4 microbatches, selective recompute, no flash, zero1, on one
    node. Per microbatch on the last stage (the slowest: it has the head):
      compute   2 x 3 x (3,145,728 + 524,288 non-causal attention FLOPs) + 3*2*64*64*128/2 head FLOPs
      memory    2 x 3 x (90,112 elementwise + 65,536 score bytes) + 64*64*24 cross-entropy bytes
      TP        2 x (2*4 - 2 hidden) x 4096 bytes + 2 x 4096 (the head's input)
      recompute 2 x (524,288 FLOPs + 65,536 bytes), the attention core
      p2p       2 x 64*64*2/2 bytes;  bubble: one microbatch of that stage
    DP: zero1 sends (4 + 2) x 1/2 bytes a parameter, half of it hidden; Adam 30 bytes a parameter / dp."""
    c, m = _round_cluster(), _small()
    L = Candidate(tp=2, pp=2, vp=1, dp=2, micro_batch=1, sp=True, recompute="selective", num_microbatches=4)
    p = predict(m, L, 64, c, flash=False)
    tb, us, params = p["time_breakdown"], 1e-6, p["memory_breakdown"]["params_on_rank"]
    per_mb = {"compute": 23.59296 * us, "memory_bound": 1.032192 * us, "tp_comm": 0.057344 * us, "cp_comm": 0.0,
              "recompute": 1.179648 * us, "pp_p2p": 0.008192 * us}
    for k, v in per_mb.items():
        assert tb[k] == pytest.approx(4 * v, abs=1e-15), k
    assert tb["bubble"] == pytest.approx(sum(per_mb.values()))
    assert tb["dp_comm"] == pytest.approx(0.5 * 3 * params * 1e-12)
    assert tb["optimizer"] == pytest.approx(params / 2 * 30e-12)
    assert tb["embedding_sync"] == 0.0
    padded = predict(_small(vocab_size=97), L, 64, c, flash=False)    # 97 pads to 128 at tp 2: the head is the same
    assert padded["time_breakdown"]["compute"] == pytest.approx(tb["compute"])
    one = predict(m, dataclasses.replace(L, pp=1, num_microbatches=2, recompute="none"), 64, c, flash=False)
    # one stage holds the embedding and the head: 4 x (2*4 - 2) x 4096 + 2 x 2 x 4096 bytes of TP per microbatch
    assert one["time_breakdown"]["tp_comm"] == pytest.approx(2 * (4 * 24576 + 16384) * 1e-12)
    # pipeline p2p per microbatch and chunk; a world of 16 spans two nodes, so the hops take the NIC (1e11 B/s)
    two = predict(m, dataclasses.replace(L, vp=2), 64, c, flash=False)
    assert two["time_breakdown"]["pp_p2p"] == pytest.approx(2 * tb["pp_p2p"])
    wide = predict(m, dataclasses.replace(L, dp=4), 64, c, flash=False)
    assert wide["time_breakdown"]["pp_p2p"] == pytest.approx(4 * 2 * 4096 / 1e11)


def test_context_parallel_step_terms():
    """cp 2, dp 2, DDP: gradients all-reduce over dp x cp = 4 ranks (3/4 of 8 bytes a parameter, half hidden) and
    every rank runs the whole Adam step; the ring always runs flash attention, so flash=False changes no time;
    with no recompute and an unpadded vocab the executed FLOPs are the model FLOPs. Memory-bound time per
    microbatch: 4 layers x (3 x 90,112 elementwise + 1 x 2048 x 34 merge + 2 x (2048 + 4096) x 18 accumulation
    bytes) + 32*128*24 cross-entropy bytes."""
    c = _round_cluster()
    m = _small(tie_embeddings=True)
    L = Candidate(tp=1, pp=1, vp=1, dp=2, micro_batch=1, sp=False, recompute="none", num_microbatches=2, cp=2)
    p = predict(m, L, 64, c, dp_mode="ddp")
    tb, params = p["time_breakdown"], p["memory_breakdown"]["params_on_rank"]
    assert tb["dp_comm"] == pytest.approx(0.5 * 0.75 * 8 * params * 1e-12)
    assert tb["optimizer"] == pytest.approx(30 * params * 1e-12)
    assert tb["embedding_sync"] == 0.0                              # tied, but one stage holds both ends
    assert tb["memory_bound"] == pytest.approx(2 * (4 * (3 * 90112 + 69632 + 221184) + 98304) * 1e-12)
    no_flash = predict(m, L, 64, c, dp_mode="ddp", flash=False)["time_breakdown"]
    assert all(no_flash[k] == pytest.approx(v) for k, v in tb.items()), (no_flash, tb)
    assert p["hw_tflops_per_gpu"] == pytest.approx(p["tflops_per_gpu"])
    sel = predict(m, dataclasses.replace(L, recompute="selective"), 64, c, dp_mode="ddp")   # re-runs no matmul:
    assert sel["hw_tflops_per_gpu"] == pytest.approx(sel["tflops_per_gpu"])               # nor counted as one


def test_closest_is_the_least_memory():
    """When nothing fits, rank_layouts reports the layout with the least memory, not the first one found."""
    m, c = _small(), Cluster(hbm_gb=1e-6)
    fits, closest = rank_layouts(m, 4, 64, 8, c)
    every = [predict(m, L, 64, c)["memory_gb"] for L in enumerate_layouts(m, 4, 64, 8, c)]
    assert not fits and len(every) > 1 and closest["memory_gb"] == min(every) < max(every)
