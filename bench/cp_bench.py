"""Context parallelism on the CPU (`bench/run.py --only cp`, or this file alone).

1. attention step: forward + backward of causal attention over one sequence (b=1, 8 query heads,
   4 KV heads, head dim 64, fp32), 1 thread per process, at s = 1024 and 2048:
     CP1 SDPA        torch's fused causal SDPA in one process (what cp = 1 runs);
     CP1 ring kernel ring_attention on a one-rank group: the pure-PyTorch block kernel, no ring;
     CP2 ring        ring_attention over 2 forked gloo ranks, each holding its zigzag half;
   wall time per step (the slower rank's, rounds interleaved, median) and process CPU time per
   rank; bytes each rank sends per step (counted by the CP group).
2. activation memory: bytes autograd keeps for backward (megagpt.activation_meter) per rank for a
   whole tiny model's forward at s = 4096, CP1 / CP2 / CP4, beside memory.memory_per_rank's
   activations for the same layout in fp32.
Prints two tables and writes JSON (default bench/out/cp.json).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagpt.parallel.context import ring_attention, zigzag_shard  # noqa: E402
from megagpt.parallel.spawn import spawn  # noqa: E402
from megagpt.parallel.state import ParallelState  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64


def _inputs(s: int):
    g = torch.Generator().manual_seed(s)
    q, dout = (torch.randn(1, s, HEADS, HEAD_DIM, generator=g) for _ in range(2))
    k, v = (torch.randn(1, s, KV_HEADS, HEAD_DIM, generator=g) for _ in range(2))
    return q, k, v, dout


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)


def _attn_worker(rank, world, s, kind, rounds):
    ps = ParallelState.create(cp=world)
    cp = ps.cp
    q, k, v, dout = (zigzag_shard(t, 1, cp.size, cp.rank) for t in _inputs(s))
    walls, cpus = [], []
    for i in range(rounds + 1):                    # round 0 warms up
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        if world > 1:
            dist.barrier()
        ps.counter.reset()
        w0, c0 = time.perf_counter(), time.process_time()
        out = _sdpa(*leaves) if kind == "sdpa" else ring_attention(*leaves, cp)
        out.backward(dout)
        if world > 1:
            dist.barrier()
        if i:
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    sent = sum(n for (kind_, _), n in ps.counter.records.items() if kind_ == "send")
    return {"wall": walls, "cpu": cpus, "sent": sent}


def run_attention(seqs=(1024, 2048), rounds: int = 3) -> list[dict]:
    rows = []
    for s in seqs:
        res = {name: spawn(world, _attn_worker, s, kind, rounds, timeout=900)
               for name, (world, kind) in {"CP1 SDPA": (1, "sdpa"), "CP1 ring kernel": (1, "ring"),
                                           "CP2 ring": (2, "ring")}.items()}
        row = {"seq_len": s}
        for name, ranks in res.items():
            wall = [max(r["wall"][i] for r in ranks) for i in range(rounds)]       # the slower rank
            row[name] = {"wall_s": statistics.median(wall), "cpu_s_per_rank": statistics.median(ranks[0]["cpu"]),
                         "bytes_sent_per_rank": ranks[0]["sent"]}
        row["speedup_cp2_vs_sdpa"] = row["CP1 SDPA"]["wall_s"] / row["CP2 ring"]["wall_s"]
        row["speedup_cp2_vs_kernel"] = row["CP1 ring kernel"]["wall_s"] / row["CP2 ring"]["wall_s"]
        rows.append(row)
    return rows


def _meter_worker(rank, world, s):
    from megagpt.activation_meter import SavedTensorMeter
    from megagpt.config import ModelConfig
    from megagpt.model.gpt import build_model
    cfg = ModelConfig(vocab_size=1024, max_seq_len=s, hidden_size=256, num_layers=2, num_heads=HEADS,
                      num_kv_heads=KV_HEADS, ffn_hidden_size=512)
    ps = ParallelState.create(cp=world)
    model = build_model(cfg, ps)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, s + 1), generator=g)
    cut = [zigzag_shard(t, 1, world, ps.cp.rank) for t in (tokens[:, :-1], tokens[:, 1:])]
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        model(*cut).sum()
    return meter.bytes


def run_memory(s: int = 4096) -> list[dict]:
    from megagpt.config import ModelConfig
    from megagpt.layout import Layout
    from megagpt.memory import memory_per_rank
    cfg = ModelConfig(vocab_size=1024, max_seq_len=s, hidden_size=256, num_layers=2, num_heads=HEADS,
                      num_kv_heads=KV_HEADS, ffn_hidden_size=512)
    rows, base = [], None
    for cp in (1, 2, 4):
        per_rank = spawn(cp, _meter_worker, s, timeout=900)
        model = memory_per_rank(cfg, Layout(cp=cp, world_size=cp, seq_len=s), dtype="fp32")["activations"]
        base = base or max(per_rank)
        rows.append({"cp": cp, "seq_len": s, "measured_bytes_per_rank": per_rank, "ratio_to_cp1": max(per_rank) / base,
                     "model_bytes_per_rank": model})
    return rows


def print_cp(res: dict) -> None:
    print("\nattention step, forward + backward (b=1, 8 q heads, 4 kv heads, d=64, fp32, 1 thread per rank)")
    print(f"{'seq':>6} {'contender':<16} {'wall ms':>9} {'cpu ms/rank':>12} {'sent/rank':>11}")
    for row in res["attention"]:
        for name in ("CP1 SDPA", "CP1 ring kernel", "CP2 ring"):
            r = row[name]
            print(f"{row['seq_len']:>6} {name:<16} {1e3 * r['wall_s']:>9.1f} {1e3 * r['cpu_s_per_rank']:>12.1f} "
                  f"{r['bytes_sent_per_rank'] / 2 ** 20:>9.2f}MB")
        print(f"{'':>6} CP2 vs CP1 SDPA x{row['speedup_cp2_vs_sdpa']:.2f}, vs the same kernel at CP1 "
              f"x{row['speedup_cp2_vs_kernel']:.2f}")
    print("\nactivation memory per rank (bytes saved for backward, whole model h256 x 2 layers, fp32)")
    print(f"{'cp':>3} {'seq':>6} {'measured MiB':>13} {'ratio':>6} {'model MiB':>10}")
    for row in res["memory"]:
        print(f"{row['cp']:>3} {row['seq_len']:>6} {max(row['measured_bytes_per_rank']) / 2 ** 20:>13.2f} "
              f"{row['ratio_to_cp1']:>6.3f} {row['model_bytes_per_rank'] / 2 ** 20:>10.2f}")


def run_cp(quick: bool = False) -> dict:
    return {"attention": run_attention((1024,) if quick else (1024, 2048), 1 if quick else 3),
            "memory": run_memory(2048 if quick else 4096), "load_average": list(os.getloadavg())}


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    out = run_cp(quick)
    print_cp(out)
    path = os.path.join(ROOT, "bench", "out", "cp.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {path}")
    print(json.dumps(out))
