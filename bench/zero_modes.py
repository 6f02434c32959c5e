"""Per-rank memory and step time of zero1, zero2 and zero3 at DP2 and DP4 on a small model.

    .venv/bin/python bench/zero_modes.py [--dtype bf16] [--steps 3] [--layers 4] [--hidden 128]

Each (mode, dp) runs real Trainer steps (pipeline engine, optimizer, gloo, one thread per rank) on
forked ranks. Memory is measured from outside, by walking every tensor reachable from the model and
the optimizer (tests/test_memory_walk.py: each storage counted once): after a step ("steady"), and
at the end of every layer's forward and after every parameter's gradient arrives in backward ("peak":
zero3's gathered units and the fp32 gradients of the groups being filled included); the formula column is
memory.bytes_per_param. Step time: the median of `steps` steps after one warm-up, and its ratio to
zero1 at the same DP. The machine is shared: read the ratios, not the absolute times.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from megagpt.config import config_from_dict  # noqa: E402
from megagpt.memory import bytes_per_param  # noqa: E402
from megagpt.parallel.spawn import spawn  # noqa: E402


def raw(mode, dp, args):
    m = dict(vocab_size=512, max_seq_len=64, hidden_size=args.hidden, num_layers=args.layers, num_heads=4,
             ffn_hidden_size=4 * args.hidden, make_vocab_divisible_by=8)
    t = dict(seq_len=64, micro_batch_size=2, global_batch_size=4 * dp, train_iters=args.steps + 1,
             eval_interval=0, save_interval=0, warmup=0, dtype=args.dtype, dp_mode=mode)
    return {"model": m, "parallel": {"bucket_size_mb": 1.0}, "train": t}


def worker(rank, world, cfg_raw, steps, run_dir):
    from megagpt.train import Trainer
    from test_memory_walk import reachable_storages
    with contextlib.redirect_stdout(io.StringIO()):
        tr = Trainer(config_from_dict(cfg_raw, world), run_dir)
    chunk, opt = tr.chunks[0], tr.optimizer
    peaks = []
    walk = lambda *_: peaks.append(sum(reachable_storages(tr.chunks, opt).values()))   # noqa: E731
    hooks = [layer.register_forward_hook(walk) for layer in chunk.layers.values()]
    hooks += [p.register_post_accumulate_grad_hook(walk) for p in chunk.parameters()]   # after the optimizer's
    tr.train_step()                                           # warm-up, and the peak walk
    for h in hooks:
        h.remove()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - start)
    rope = sum(reachable_storages(chunk._rope_cache).values())
    steady = sum(reachable_storages(tr.chunks, opt).values()) - rope
    return {"params": sum(p.numel() for p in chunk.parameters()), "steady": steady,
            "peak": max(peaks) - rope, "step_s": statistics.median(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    args = ap.parse_args()
    rows = []
    for dp in (2, 4):
        for mode in ("zero1", "zero2", "zero3"):
            res = spawn(dp, worker, raw(mode, dp, args), args.steps, f"/tmp/zero_bench_{os.getpid()}", timeout=600)
            psi = res[0]["params"]
            rows.append({"mode": mode, "dp": dp, "params": psi,
                         "steady_B_per_param": max(r["steady"] for r in res) / psi,
                         "peak_B_per_param": max(r["peak"] for r in res) / psi,
                         "formula_B_per_param": sum(bytes_per_param(args.dtype, dp, True, mode).values()),
                         "steady_MiB": max(r["steady"] for r in res) / 2 ** 20,
                         "step_s": max(r["step_s"] for r in res)})
    for r in rows:
        base = next(x for x in rows if x["dp"] == r["dp"] and x["mode"] == "zero1")
        r["step_time_vs_zero1"] = r["step_s"] / base["step_s"]
    print(f"{'mode':6} {'dp':>3} {'params':>9} {'steady B/p':>10} {'formula':>8} {'peak B/p':>9} "
          f"{'steady MiB':>10} {'step s':>8} {'vs zero1':>8}")
    for r in rows:
        print(f"{r['mode']:6} {r['dp']:>3} {r['params']:>9} {r['steady_B_per_param']:>10.3f} "
              f"{r['formula_B_per_param']:>8.3f} {r['peak_B_per_param']:>9.3f} {r['steady_MiB']:>10.2f} "
              f"{r['step_s']:>8.3f} {r['step_time_vs_zero1']:>8.2f}")
    print(json.dumps({"dtype": args.dtype, "layers": args.layers, "hidden": args.hidden, "rows": rows}))


if __name__ == "__main__":
    main()
