"""Attention variants on the CPU: tokens/s of one attention core (forward + backward) at s = 1024 and 2048
for full causal, sliding window and window + global workspace tokens, beside the FLOPs each mask should
save (the visible (query, key) pairs it keeps, against full causal's).

    python bench/attention_bench.py [--seqs 1024 2048] [--window 128] [--workspace 4 --every 256] [--json]

Rows:
  full                 SDPA is_causal (torch's fused CPU flash kernel)
  window (dense mask)  SDPA with the band as a bool mask: all s^2 scores computed (what core_attention runs
                       with packed samples or attention dropout)
  window (blocked)     model/variants.blocked_attention: blocks of queries against the keys the window reaches
                       (what the model runs for a window without flash-attn)
  window+global        blocked_attention with workspace slots (the model's one-process path)
Shape: b=1, 8 heads (4 KV heads), head dim 64, fp32, one thread. Contenders alternate round by round and
the median time per round is reported; the machine is shared, so read ratios, not absolute numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.config import ModelConfig  # noqa: E402
from megagpt.model.variants import attention_mask, blocked_attention, workspace_slots  # noqa: E402
from megagpt.parallel.context import band_mask  # noqa: E402


def visible_pairs(m: ModelConfig, s: int) -> int:
    pos = torch.arange(s)
    return int(attention_mask(m, s, pos, pos).sum())


def computed_pairs(name: str, m: ModelConfig, s: int, block: int = 128) -> int:
    """(query, key) scores each contender actually computes: the causal half (the fused kernel skips
    masked blocks, roughly), all s^2 (a dense mask), or the blocked path's key sets."""
    if name == "full":
        return s * (s + 1) // 2
    if name.endswith("(dense mask)"):
        return s * s
    w = m.attention_window or s
    slot_pos = workspace_slots(s, m.workspace_tokens, m.workspace_every).nonzero().flatten()
    total = 0
    for a in range(0, s, block):
        b, lo = min(a + block, s), max(0, a - w + 1)
        total += (b - a) * (int((slot_pos < lo).sum()) + b - lo)
    return total + len(slot_pos) * s


def contenders(s: int, window: int, n: int, every: int):
    full, win = ModelConfig(), ModelConfig(attention_window=window)
    ws = ModelConfig(attention_window=window, workspace_tokens=n, workspace_every=every)
    pos = torch.arange(s)
    band = band_mask(pos, pos, window)

    def sdpa(q, k, v, mask=None):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return {"full": (full, lambda q, k, v: sdpa(q, k, v)),
            "window (dense mask)": (win, lambda q, k, v: sdpa(q, k, v, band)),
            "window (blocked)": (win, lambda q, k, v: blocked_attention(q, k, v, win)),
            "window+global": (ws, lambda q, k, v: blocked_attention(q, k, v, ws))}


def run(seqs, window, n, every, rounds, heads=8, kv_heads=4, d=64):
    torch.set_num_threads(1)
    rows = []
    for s in seqs:
        g = torch.Generator().manual_seed(s)
        q = torch.randn(1, s, heads, d, generator=g, requires_grad=True)
        k, v = (torch.randn(1, s, kv_heads, d, generator=g, requires_grad=True) for _ in range(2))
        fns = contenders(s, window, n, every)
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, (_, fn) in fns.items():
                start = time.perf_counter()
                fn(q, k, v).sum().backward()
                times[name].append(time.perf_counter() - start)
                q.grad = k.grad = v.grad = None
        full_pairs = visible_pairs(fns["full"][0], s)
        base = statistics.median(times["full"])
        for name, (m, _) in fns.items():
            t = statistics.median(times[name])
            pairs = visible_pairs(m, s)
            rows.append({"seq_len": s, "variant": name, "tokens_per_s": s / t, "speedup_vs_full": base / t,
                         "visible_pairs": pairs, "attention_flops_vs_full": pairs / full_pairs,
                         "computed_vs_full": computed_pairs(name, m, s) / computed_pairs("full", m, s),
                         "attention_gflop": 4 * pairs * d * heads * 3 / 1e9})   # fwd + bwd ~ 3x fwd
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--workspace", type=int, default=4)
    ap.add_argument("--every", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    a = ap.parse_args(argv)
    rows = run(a.seqs, a.window, a.workspace, a.every, a.rounds)
    if not a.json:
        print(f"attention core fwd+bwd, b=1, 8 heads (4 KV), d=64, fp32, 1 thread; window {a.window}, "
              f"{a.workspace} workspace tokens every {a.every}")
        print("FLOPs vs full: visible (query, key) pairs of the mask over full causal's (what it should save);")
        print("computed: the scores the contender really computes over full causal's\n")
        print(f"{'s':>5} {'variant':<20} {'tokens/s':>9} {'vs full':>8} {'FLOPs vs full':>14} {'computed':>9} "
              f"{'GFLOP':>7}")
        for r in rows:
            print(f"{r['seq_len']:>5} {r['variant']:<20} {r['tokens_per_s']:>9.0f} {r['speedup_vs_full']:>7.2f}x "
                  f"{r['attention_flops_vs_full']:>13.3f} {r['computed_vs_full']:>9.3f} {r['attention_gflop']:>7.2f}")
    print(json.dumps({"bench": "attention_variants", "window": a.window, "workspace_tokens": a.workspace,
                      "workspace_every": a.every, "rows": rows}))


if __name__ == "__main__":
    main()
