"""Layout planner: enumerate (tp, pp, vp, dp, micro batch, SP, recompute), keep the layouts whose
memory (megagpt.memory) fits, predict each one's step time, rank by throughput.

Time model (per optimizer step, for the slowest pipeline rank; every constant lives in Cluster):
  - matmul FLOPs (GEMMs, and without flash attention the score/value products) at `gemm_eff` of
    peak: one global constant, the same for every layout and model. Backward is 2x forward. With
    flash attention (and always under CP: the ring's blocks are flash-attn 2 calls on a GPU) the
    attention FLOPs run at `attn_eff` instead: flash-attn 2 reaches about 35% of an H100's peak
    (Shah et al. 2024, FlashAttention-3, sec. 1 and fig. 5), half of what the GEMMs reach.
  - memory-bound elementwise work (norms, bias-dropout-add, RoPE, activation function, and
    without flash attention the s^2 softmax/dropout traffic) at `mem_eff` of HBM bandwidth;
    this is what makes small-h / long-s models less efficient, with no size-dependent fudge.
  - TP: per layer per microbatch 4 collectives forward and 4 backward (all-reduces, or with SP
    all-gathers + reduce-scatters, same bytes: GUIDE "Communication volume"); the all-gathers
    that SP repeats in backward are assumed hidden behind the weight-gradient GEMMs. Of the 4
    backward collectives, the QKV and fc1 input-gradient ones overlap their layer's weight-gradient
    GEMM (parallel/tp_overlap.py): only what each takes beyond that GEMM is exposed; the other 6
    are not overlapped. Over NVLink (per-direction = nvlink_gbps/2) within a node.
  - PP: per microbatch and chunk one [s/t, b, h] activation forward and one gradient backward
    (scatter-gather when SP is off), over the network when stages span nodes; not overlapped.
  - bubble: (pp-1)/vp of the slowest stage's per-microbatch time; that stage includes the
    LM head (last) or embedding (first), so uneven splits and the head imbalance show.
  - recompute: full re-runs each layer's forward (compute, memory traffic and TP comm, i.e.
    4/3 of the layer's compute); selective re-runs the attention core.
  - CP (context parallelism, cp = c): each rank runs s/c tokens of every sequence; GEMM, memory-bound
    and TP terms are those of s/c tokens, attention FLOPs are 1/c of the sequence's (zigzag
    balances them). The ring (parallel/context.py) sends per layer and microbatch c-1 K/V blocks
    [2, b, s/c, kv_r, d] forward, and backward c-1 K/V blocks plus c dK/dV blocks in fp32
    (comm_model.cp_ring_bytes); each hop overlaps one of the c equal attention blocks, so only
    what a hop takes beyond its block (and the last dK/dV hop) is exposed. The ring's ranks are
    tp apart; its hops are point-to-point, so a hop that leaves the node gets one NIC (a collective
    ring spreads over the node's NICs, a p2p hop does not), and the ring runs at its slowest hop.
    Memory-bound ring work (parallel/context.py as written, PyTorch eager ops): each forward hop
    merges a block into the fp32 output (the block output made fp32, the output rescaled, a
    rescaled copy of the block added: 34 bytes per output element, all query rows on the most loaded
    rank); each backward step adds dq and dK/dV blocks into fp32 accumulators (18 bytes per element).
    Ring attention keeps no s^2 term, as flash attention.
  - EP (MoE models, ep in 1, 2, 4, .. dividing the experts and dp): per MoE layer per microbatch
    2 all-to-alls forward and 2 backward of k*s*b(/t) rows, (ep-1)/ep of them leaving the rank,
    over the EP ring (ranks tp apart); MoE layers' FLOPs count the router and top_k experts.
  - DP: distributed optimizer = reduce-scatter of fp32 grads + all-gather of the weights, each
    (d-1)/d of the rank's bytes (all-reduce of fp32 grads without it); `dp_overlap` (0.5) of it
    is assumed hidden behind backward / next forward. Plus the Adam step at HBM bandwidth. With CP
    the gradients are reduced (and the optimizer sharded) over dp*cp ranks.
Throughput is reported as model FLOPs (model_size.flops_per_token: 3x forward, causal attention,
no recompute) per GPU, and MFU = that / peak. `paper_flops` is Megatron's 96Bslh^2(...) formula
(which counts the recompute forward), used only for the Narayanan et al. 2021 validation.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from .config import DTYPES, RECOMPUTE, ConfigError, ModelConfig, load_config
from .model_size import count_params, flops_per_token, layer_flops
from .layout import Layout
from .memory import memory_per_rank


@dataclass
class Cluster:
    """Hardware (defaults: H100 SXM) and the time model's derating constants. Only gemm_eff was
    fitted (once, globally); attn_eff, mem_eff, link_eff, latency and dp_overlap are set a priori."""
    name: str = "H100-SXM"
    gpus_per_node: int = 8
    peak_tflops: float = 989.0      # dense bf16
    hbm_gb: float = 80.0            # GiB per GPU
    hbm_tbps: float = 3.35          # TB/s
    nvlink_gbps: float = 900.0      # GB/s per GPU, both directions together
    network_gbps: float = 400.0     # Gb/s per GPU, each direction
    gemm_eff: float = 0.70          # achieved fraction of peak for the matmuls: one global constant, fitted once
                                    # on Narayanan et al. 2021 Table 1 (max error 6.2%), assumed to carry to H100
    attn_eff: float = 0.35          # achieved fraction of peak for flash attention (flash-attn 2 on H100: 35%,
                                    # FlashAttention-3 paper); set a priori, not fitted
    mem_eff: float = 0.8            # achieved fraction of HBM bandwidth for elementwise kernels
    link_eff: float = 0.8           # achieved fraction of link bandwidth for collectives and p2p
    latency_us: float = 10.0        # per collective / p2p message
    dp_overlap: float = 0.5         # share of DP communication hidden behind compute
    reserve: float = 0.9            # usable share of HBM (allocator fragmentation, CUDA context, NCCL)


def a100_selene() -> Cluster:
    """The Narayanan et al. 2021 machine: DGX A100 80GB, NVLink 600 GB/s, 8x200 Gb/s HDR per node."""
    return Cluster(name="A100-SXM-80GB", peak_tflops=312.0, hbm_tbps=2.039, nvlink_gbps=600.0, network_gbps=200.0)


@dataclass(frozen=True)
class Candidate:
    """One point of the search: a layout (on a world of tp*pp*dp GPUs) and a recompute choice."""
    tp: int
    pp: int
    vp: int
    dp: int
    micro_batch: int
    sp: bool
    recompute: str
    num_microbatches: int
    cp: int = 1
    ep: int = 1                      # experts split over ep of the dp ranks (MoE models)

    def layout(self, seq_len: int) -> Layout:
        return Layout(tp=self.tp, cp=self.cp, pp=self.pp, vp=self.vp, world_size=self.tp * self.cp * self.pp * self.dp,
                      sp=self.sp, ep=self.ep, seq_len=seq_len, micro_batch=self.micro_batch,
                      global_batch=self.micro_batch * self.num_microbatches * self.dp)


def paper_flops(m: ModelConfig, batch: int, seq_len: int) -> float:
    """Narayanan et al. 2021 eq. (3): FLOPs per iteration with full recompute, GPT-3 style models."""
    l, h, v = m.num_layers, m.hidden_size, m.vocab_size
    return 96.0 * batch * seq_len * l * h * h * (1 + seq_len / (6 * h) + v / (16 * l * h))


def _ring_bw(c: Cluster, size: int, stride: int) -> float:
    """Per-rank bytes/s of a ring over `size` ranks `stride` apart. Within a node: NVLink. Across
    nodes each node's NICs carry the ring's hops, so k members per node get k NICs' bandwidth."""
    nvlink = c.nvlink_gbps / 2 * 1e9 * c.link_eff
    if size * stride <= c.gpus_per_node:
        return nvlink
    per_node = max(1, min(size, c.gpus_per_node // stride))
    return min(nvlink, per_node * c.network_gbps / 8 * 1e9 * c.link_eff)


def _p2p_ring_bw(c: Cluster, size: int, stride: int) -> float:
    """Per-rank bytes/s of a ring of point-to-point hops over `size` ranks `stride` apart: NVLink
    within a node; once the ring leaves the node its slowest hop is one GPU's NIC."""
    nvlink = c.nvlink_gbps / 2 * 1e9 * c.link_eff
    if size * stride <= c.gpus_per_node:
        return nvlink
    return min(nvlink, c.network_gbps / 8 * 1e9 * c.link_eff)


def _layer_costs(m: ModelConfig, L: Candidate, s: int, e: int, flash: bool, c: Cluster) -> dict:
    """Seconds for one layer and one microbatch on one rank, forward only (backward = 2x).

    Memory-bound bytes per token: replicated over TP (/t with SP) two norms (read + write h)
    and two bias-dropout-adds (read 2h, write h, 1-byte mask if dropout); TP-sharded RoPE on Q
    and K (read + write) and the activation function (GELU 2f/t, SwiGLU 3f/t); without flash,
    per score element: write scores, softmax read + write, PV read (+ dropout read, write, mask).
    Flash attention FLOPs skip the causal half and run at attn_eff."""
    t, b, cp = L.tp, L.micro_batch, L.cp
    h, d, f, tok = m.hidden_size, m.head_dim, m.ffn_hidden_size, s // cp * b      # this rank's tokens
    a_r, kv_r = m.num_heads // t, m.kv_heads_per_rank(t)
    layers = range(m.num_layers) if m.moe_num_experts or m.mod_layers else [0]        # layers that differ
    per_layer = [layer_flops(m, s, t, flash, i) for i in layers]
    gemm, attn = (tok * sum(x) / len(per_layer) for x in zip(*per_layer))   # flash skips the masked half
    rep = (1 / t if L.sp else 1) * tok * (10 * e * h + (2 * h if m.hidden_dropout > 0 else 0))
    shard = tok * e * (2 * (a_r + kv_r) * d * m.rotary_fraction + (3 if m.gated else 2) * f / t)
    core = 0.0 if flash else tok * a_r * s * (4 * e + (2 * e + 1 if m.attention_dropout > 0 else 0))
    flop_s, byte_s = c.peak_tflops * 1e12 * c.gemm_eff, c.hbm_tbps * 1e12 * c.mem_eff
    attn_s = attn / (c.peak_tflops * 1e12 * c.attn_eff) if flash else attn / flop_s
    comm = hidden = 0.0
    if t > 1:
        one = (t - 1) / t * tok * h * e / _ring_bw(c, t, 1) + c.latency_us * 1e-6
        comm = 4 * one
        # backward: the QKV and fc1 input-gradient collectives run during their weight-gradient GEMMs
        # (parallel/tp_overlap.py, always on for tp > 1); a MoE layer's experts are not column-parallel
        wgrad = [tok * 2 * h * (a_r + 2 * kv_r) * d]                               # QKV weight gradient
        wgrad += [] if m.moe_num_experts else [tok * 2 * h * (2 * f if m.gated else f) / t]   # fc1's
        hidden = sum(min(one, w / flop_s) for w in wgrad)
    cp_fwd = cp_bwd = cp_mem_fwd = cp_mem_bwd = 0.0
    if cp > 1:   # each hop hides behind one of the cp equal attention blocks (backward: 2x the compute)
        bw, lat = _p2p_ring_bw(c, cp, t), c.latency_us * 1e-6
        kv = 2 * tok * kv_r * d                                   # elements of one K/V block
        step = attn_s / cp
        cp_fwd = (cp - 1) * max(0.0, kv * e / bw + lat - step)
        cp_bwd = (cp - 1) * max(0.0, kv * (e + 4) / bw + 2 * lat - 2 * step) + kv * 4 / bw + lat
        q_el = tok * a_r * d                                      # elements of this rank's attention output
        cp_mem_fwd = (cp - 1) * q_el * 34 / byte_s                # online-softmax merges, fp32
        cp_mem_bwd = cp * (q_el + kv) * 18 / byte_s               # dq, dK/dV accumulation, fp32
    if L.ep > 1:     # 2 all-to-alls of k*tok/t rows forward (dispatch, combine), (ep-1)/ep of them leaving
        share = sum(m.is_moe_layer(i) for i in range(m.num_layers)) / m.num_layers
        rows = m.moe_top_k * tok / (t if L.sp else 1)
        comm += share * 2 * ((L.ep - 1) / L.ep * rows * h * e / _ring_bw(c, L.ep, t) + c.latency_us * 1e-6)
    return {"gemm": gemm / flop_s, "attn": attn_s, "mem": (rep + shard) / byte_s, "core_mem": core / byte_s,
            "comm": comm, "comm_hidden": hidden, "cp_fwd": cp_fwd, "cp_bwd": cp_bwd, "cp_mem_fwd": cp_mem_fwd, "cp_mem_bwd": cp_mem_bwd,
            "flops": gemm + attn}


def predict(m: ModelConfig, L: Candidate, seq_len: int, cluster: Cluster, dtype: str = "bf16", flash: bool = True,
            distributed_optimizer: bool = True, dp_mode: str | None = None) -> dict:
    """Memory and step time of one layout; see the module docstring for the model. dp_mode (train.dp_mode;
    None: zero1, or ddp without the distributed optimizer): zero2 reduce-scatters the fp32 grads on every
    microbatch, zero3 also all-gathers the weights twice per microbatch (memory: memory_per_rank's)."""
    c, s, t, pp, vp, cp = cluster, seq_len, L.tp, L.pp, L.vp, L.cp
    e = DTYPES[dtype].itemsize
    layout = L.layout(s)
    mode = dp_mode or ("zero1" if distributed_optimizer else "ddp")
    mem = memory_per_rank(m, layout, dtype, mode != "ddp", L.recompute, None, flash, dp_mode=mode)
    lc = _layer_costs(m, L, s, e, flash or cp > 1, c)
    tok, h, vpad = s // cp * L.micro_batch, m.hidden_size, m.padded_vocab(t)   # this rank's tokens
    flop_s, byte_s = c.peak_tflops * 1e12 * c.gemm_eff, c.hbm_tbps * 1e12 * c.mem_eff
    act_bytes = tok * h * e
    tp_bw = _ring_bw(c, t, 1)
    one_coll = (t - 1) / t * act_bytes / tp_bw + c.latency_us * 1e-6 if t > 1 else 0.0
    pp_bw = c.nvlink_gbps / 2 * 1e9 * c.link_eff if t * cp * L.dp * pp <= c.gpus_per_node \
        else c.network_gbps / 8 * 1e9 * c.link_eff
    p2p = vp * 2 * (act_bytes / t / pp_bw + c.latency_us * 1e-6) if pp > 1 else 0.0
    fwd = lc["gemm"] + lc["attn"] + lc["mem"] + lc["core_mem"] + lc["comm"] + lc["cp_fwd"] + lc["cp_mem_fwd"]
    rc = {"none": 0.0, "selective": lc["attn"] + lc["core_mem"] + lc["cp_fwd"] + lc["cp_mem_fwd"],
          "full": fwd}[L.recompute]
    head_flops = 3 * 2 * tok * h * vpad / t

    ranks = []
    for r, n in enumerate(mem["layers_per_rank"]):
        parts = {"compute": n * 3 * (lc["gemm"] + lc["attn"]),
                 "memory_bound": n * (3 * (lc["mem"] + lc["core_mem"]) + lc["cp_mem_fwd"] + lc["cp_mem_bwd"]),
                 "tp_comm": n * (2 * lc["comm"] - lc["comm_hidden"]), "cp_comm": n * (lc["cp_fwd"] + lc["cp_bwd"]),
                 "recompute": n * rc, "pp_p2p": p2p}
        flops = n * 3 * lc["flops"] + (n * lc["flops"] * (L.recompute == "full"))
        if r == 0:
            parts["tp_comm"] += 2 * one_coll    # embedding: one all-reduce fwd, or RS fwd + AG bwd with SP
        if r == pp - 1:
            parts["compute"] += head_flops / flop_s
            parts["memory_bound"] += tok * vpad / t * 24 / byte_s   # vocab-parallel CE, fwd + bwd, fp32
            parts["tp_comm"] += 2 * one_coll    # head input: AR bwd, or AG fwd + RS bwd with SP
            flops += head_flops
        ranks.append((sum(parts.values()), parts, flops))
    t_mb, parts, _ = max(ranks, key=lambda x: x[0])
    step = {k: v * L.num_microbatches for k, v in parts.items()}
    step["bubble"] = (pp - 1) / vp * t_mb

    params, w = mem["params_on_rank"], e
    d, dc = L.dp, L.dp * cp         # gradients are reduced over dp x cp (parameters replicated over CP)
    per_mb = L.num_microbatches
    dp_bytes = params * (dc - 1) / dc * {"ddp": 2 * 4, "zero1": 4 + w, "zero2": 4 * per_mb + w,
                                         "zero3": (4 + 2 * w) * per_mb}[mode]
    step["dp_comm"] = (1 - c.dp_overlap) * dp_bytes / _ring_bw(c, dc, t) if dc > 1 else 0.0
    step["optimizer"] = params / (1 if mode == "ddp" else dc) * 30 / byte_s   # (experts: /edp, ignored)
    step["embedding_sync"] = 0.0
    if m.tie_embeddings and pp > 1:   # tied embedding grads all-reduced between the first and last stage
        step["embedding_sync"] = vpad / t * h * 4 / (c.network_gbps / 8 * 1e9 * c.link_eff)
    step_time = sum(step.values())

    gpus = t * cp * pp * d
    global_batch = L.micro_batch * L.num_microbatches * d
    tokens = global_batch * s
    model_tflops = flops_per_token(m, s) * tokens / step_time / gpus / 1e12
    hw_tflops = sum(x[2] for x in ranks) * t * cp * d * L.num_microbatches / step_time / gpus / 1e12
    hbm = c.hbm_gb * 2 ** 30
    return {"tp": t, "cp": cp, "pp": pp, "vp": vp, "dp": d, "ep": L.ep, "sp": L.sp, "recompute": L.recompute,
            "micro_batch": L.micro_batch, "num_microbatches": L.num_microbatches,
            "memory_gb": mem["total"] / 2 ** 30, "fits": mem["total"] <= c.reserve * hbm,
            "tflops_per_gpu": model_tflops, "hw_tflops_per_gpu": hw_tflops, "mfu": model_tflops / c.peak_tflops,
            "step_time_s": step_time, "tokens_per_s": tokens / step_time,
            "memory_breakdown": {k: v / 2 ** 30 for k, v in mem.items()
                                 if k in ("weights", "grads", "optimizer", "activations", "total")}
            | {k: mem[k] for k in ("params_on_rank", "params_per_rank", "pp_rank")},
            "time_breakdown": step}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0] or [1]


CP_DEGREES = (1, 2, 4, 8, 16)


def enumerate_layouts(m: ModelConfig, gpus: int, seq_len: int, global_batch: int, cluster: Cluster,
                      tp: int | None = None, pp: int | None = None, vp: int | None = None,
                      micro_batch: int | None = None, sp: bool | None = None, recompute: str | None = None,
                      cp: int | None = None):
    """Every layout the engine can run (a given argument fixes that dimension): tp | gpus_per_node,
    cp in 1,2,4,8,16 dividing gpus/tp, pp | gpus/(tp*cp), vp in 1,2,4,.., micro batch in 1,2,4,8, SP on/off for tp > 1, recompute none/
    selective/full, each kept when `Layout.validate` (the rules the config and the engine apply)
    accepts it. When none passes, the first candidate's ConfigError is raised: it names the field."""
    first_error, found = None, False
    for t, k in itertools.product([tp] if tp is not None else _divisors(cluster.gpus_per_node),
                                  [cp] if cp is not None else CP_DEGREES):
        if cp is None and k > 1 and isinstance(t, int) and t > 0 and gpus % (t * k):   # cp=1 shows a bad tp
            continue
        tk = t * k if isinstance(t, int) and isinstance(k, int) and t > 0 and k > 0 else 1
        for p in [pp] if pp is not None else _divisors(gpus // tk):
            vps = [vp] if vp is not None else [1] + [v for v in (2, 4, 8, 16) if p > 1]
            for v, mb, s, rc in itertools.product(vps, [micro_batch] if micro_batch is not None else (1, 2, 4, 8),
                                                  [sp] if sp is not None else (False, True),
                                                  [recompute] if recompute is not None else RECOMPUTE):
                if s and t == 1:                     # no SP at tp = 1 (the layout with SP off)
                    continue
                for ep in ([1] + [n for n in (2, 4, 8, 16, 32, 64) if n <= m.moe_num_experts]
                           if m.moe_num_experts else [1]):
                    layout = Layout(tp=t, cp=k, pp=p, vp=v, world_size=gpus, sp=s, seq_len=seq_len,
                                    micro_batch=mb, global_batch=global_batch, ep=ep)
                    try:
                        layout.validate(m)
                    except ConfigError as e:
                        first_error = first_error or e
                        continue
                    found = True
                    yield Candidate(t, p, v, layout.dp, mb, layout.sp, rc, layout.num_microbatches, cp=k, ep=ep)
    if not found and first_error is not None:
        raise first_error


def rank_layouts(m: ModelConfig, gpus: int, seq_len: int, global_batch: int, cluster: Cluster | None = None,
                 dp_mode: str | None = None, **fixed) -> tuple[list[dict], dict | None]:
    """(layouts that fit, best first; the non-fitting layout with the least memory, or None).
    `fixed` takes enumerate_layouts' tp, cp, pp, vp, micro_batch, sp, recompute; dp_mode is predict's."""
    c = cluster or Cluster()
    fits, closest = [], None
    for L in enumerate_layouts(m, gpus, seq_len, global_batch, c, **fixed):
        p = predict(m, L, seq_len, c, dp_mode=dp_mode)
        if p["fits"]:
            fits.append(p)
        elif closest is None or p["memory_gb"] < closest["memory_gb"]:
            closest = p
    fits.sort(key=lambda p: p["step_time_s"])
    return fits, closest


def choose_layout(model_cfg: ModelConfig, gpus: int, seq_len: int, global_batch: int,
                  cluster: Cluster | None = None) -> dict:
    """The fastest layout that fits (fits=True), or the closest to fitting (fits=False)."""
    fits, closest = rank_layouts(model_cfg, gpus, seq_len, global_batch, cluster)
    if fits:
        return fits[0]
    if closest is None:
        raise ConfigError(f"gpus: no layout of {gpus} GPUs fits the model and global_batch={global_batch}")
    return closest


# ----------------------------------------------------------------------------- validation and flagship

def narayanan2021_rows() -> list[dict]:
    """Table 1 of Narayanan et al. 2021 with the micro batch and interleaving of their released
    scripts (Megatron-LM examples/sc21/run_table_1.sh: MBS and --num-layers-per-virtual-pipeline-stage)."""
    cols = ("params_b", "heads", "hidden", "layers", "tp", "pp", "gpus", "batch", "tflops", "micro_batch", "vp")
    table = [(1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 16, 1),
             (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 16, 1),
             (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 16, 1),
             (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 8, 1),
             (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 4, 1),
             (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 2, 3),
             (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 2, 2),
             (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 1, 2),
             (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 1, 3),
             (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 1, 1)]
    return [dict(zip(cols, row)) for row in table]


def gpt3_style(hidden: int, layers: int, heads: int, vocab: int = 51200, seq_len: int = 2048) -> ModelConfig:
    """GPT-3 style: MHA, 4h GELU MLP, LayerNorm, biases, tied embeddings, dropout 0.1."""
    return ModelConfig(vocab_size=vocab, max_seq_len=seq_len, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       ffn_hidden_size=4 * hidden, mlp="gelu", norm="layernorm", bias=True, tie_embeddings=True,
                       hidden_dropout=0.1, attention_dropout=0.1)


def paper_params(m: ModelConfig, seq_len: int = 2048) -> int:
    """count_params plus the learned position embeddings [s, h] of GPT-3 style models (megagpt uses RoPE)."""
    return count_params(m) + seq_len * m.hidden_size


def validate_narayanan2021(cluster: Cluster | None = None) -> list[dict]:
    """Predicted vs published TFLOP/s per GPU (paper formula over predicted step time) for each row.
    Their runs: fp16, full recompute, no sequence parallel, no distributed optimizer, no flash."""
    c = cluster or a100_selene()
    out = []
    for row in narayanan2021_rows():
        m = gpt3_style(row["hidden"], row["layers"], row["heads"])
        lay = Layout(tp=row["tp"], pp=row["pp"], world_size=row["gpus"], micro_batch=row["micro_batch"],
                     global_batch=row["batch"])
        L = Candidate(row["tp"], row["pp"], row["vp"], lay.dp, row["micro_batch"], False, "full", lay.num_microbatches)
        p = predict(m, L, 2048, c, dtype="fp16", flash=False, distributed_optimizer=False)
        tflops = paper_flops(m, row["batch"], 2048) / p["step_time_s"] / row["gpus"] / 1e12
        out.append(row | {"predicted": tflops, "error": tflops / row["tflops"] - 1,
                          "params_predicted_b": paper_params(m) / 1e9, "memory_gb": p["memory_gb"], "fits": p["fits"]})
    return out


def gpt4plus_70b() -> ModelConfig:
    """examples/configs/gpt4plus-70b.yaml when present, else the same model built here."""
    path = Path(__file__).resolve().parent.parent / "examples" / "configs" / "gpt4plus-70b.yaml"
    if path.is_file():
        return load_config(path).model
    return ModelConfig(vocab_size=64000, max_seq_len=32768, hidden_size=10240, num_layers=70, num_heads=80,
                       num_kv_heads=8, ffn_hidden_size=24576, mlp="swiglu", norm="rmsnorm", tie_embeddings=False,
                       bias=False)


def flagship(cluster: Cluster | None = None, gpu_counts=(8, 64, 512, 1024), seq_lens=(8192, 32768),
             tokens_per_batch: int = 8 * 2 ** 20) -> list[dict]:
    """gpt4plus-70b on H100s: the chosen layout per (gpus, seq_len), global batch = 8M tokens."""
    m, out = gpt4plus_70b(), []
    for s in seq_lens:
        m = dataclasses.replace(m, max_seq_len=max(m.max_seq_len, s))
        for g in gpu_counts:
            gb = max(1, tokens_per_batch // s)
            out.append({"gpus": g, "seq_len": s, "global_batch": gb} | choose_layout(m, g, s, gb, cluster))
    return out
