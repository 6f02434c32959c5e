"""DP2 step time with the distributed optimizer's parameter all-gather overlapped with the next forward
(parallel.overlap_param_gather) against the same run with every gather finished inside step().

    .venv/bin/python bench/param_gather_overlap.py [--rounds 6] [--steps 3] [--hidden 512]

Two Trainers (the real training path: pipeline engine, grad buffer, ZeRO-1 optimizer) on the same two
forked ranks, gloo, one thread each, one with the flag on and one off. Each round times a block of
`steps` train_steps of each, alternating which goes first; a block ends with finish_param_sync(),
so the last step's gathers are inside it. Also timed: the optimizer's gather waits (`wait_from`)
per step, i.e. the all-gather time that is still exposed, and rank 0's process CPU time (all its
threads). The machine is shared: read the ratios, medians of per-round ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagpt.config import config_from_dict  # noqa: E402
from megagpt.parallel.spawn import spawn  # noqa: E402


def raw_config(hidden: int, layers: int, bucket_mb: float, overlap: bool, global_batch: int = 8) -> dict:
    model = dict(hidden_size=hidden, num_layers=layers, num_heads=8, num_kv_heads=4, ffn_hidden_size=3 * hidden,
                 vocab_size=4096, max_seq_len=64, make_vocab_divisible_by=128)
    train = dict(seq_len=64, micro_batch_size=1, global_batch_size=global_batch, eval_interval=0, warmup=0,
                 train_iters=1000, save_interval=0)
    return {"model": model, "train": train,
            "parallel": dict(bucket_size_mb=bucket_mb, overlap_param_gather=overlap)}


def _worker(rank, world, args):
    from megagpt.train import Trainer
    trainers = {}
    for overlap in (False, True):
        with contextlib.redirect_stdout(io.StringIO()):
            raw = raw_config(args.hidden, args.layers, args.bucket_mb, overlap, args.global_batch)
            trainers[overlap] = Trainer(config_from_dict(raw, world), os.devnull)
    waits = {k: 0.0 for k in trainers}
    for overlap, tr in trainers.items():
        tr.train_step()                                   # warm-up: Adam state, schedule caches
        tr.optimizer.finish_param_sync()
        inner = tr.optimizer.update.wait_from

        def timed(first, inner=inner, overlap=overlap):
            start = time.perf_counter()
            inner(first)
            waits[overlap] += time.perf_counter() - start
        tr.optimizer.update.wait_from = timed             # instance attribute: the hooks call it too
    rounds = []
    for r in range(args.rounds):
        times = {}
        for overlap in ((False, True) if r % 2 == 0 else (True, False)):
            tr = trainers[overlap]
            dist.barrier()
            start, cpu = time.perf_counter(), time.process_time()      # process CPU: gloo's threads too
            for _ in range(args.steps):
                tr.train_step()
            tr.optimizer.finish_param_sync()
            cpu = time.process_time() - cpu
            dist.barrier()
            times[overlap] = ((time.perf_counter() - start) / args.steps, cpu / args.steps)
        rounds.append(times)
    n = args.rounds * args.steps
    return {"rounds": [[t[False][0], t[True][0]] for t in rounds], "cpu": [[t[False][1], t[True][1]] for t in rounds],
            "wait": [waits[False] / n, waits[True] / n],
            "buckets": len(trainers[True].optimizer.buffer.buckets),
            "params": sum(p.numel() for c in trainers[True].chunks for p in c.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    ap.add_argument("--global-batch", type=int, default=8, help="sequences of 64 tokens per step (DP2: /2 per rank)")
    args = ap.parse_args()
    res = spawn(2, _worker, args, timeout=1800)[0]
    off = [a for a, _ in res["rounds"]]
    on = [b for _, b in res["rounds"]]
    ratio = statistics.median(b / a for a, b in res["rounds"])
    print(f"DP2, h={args.hidden} L={args.layers}, {res['params'] / 1e6:.1f}M params, {res['buckets']} buckets, "
          f"global batch {args.global_batch}x64 tokens, "
          f"{args.rounds} rounds x {args.steps} steps, gloo, 1 thread per rank")
    print(f"  step time, gathers in step():        median {statistics.median(off) * 1e3:8.1f} ms")
    print(f"  step time, gathers overlap forward:  median {statistics.median(on) * 1e3:8.1f} ms")
    print(f"  overlapped / synchronous (median of per-round ratios): {ratio:.3f}")
    cpu = statistics.median(b / a for a, b in res["cpu"])
    print(f"  rank 0 process CPU time, overlapped / synchronous:     {cpu:.3f}")
    sync, overlapped = (w * 1e3 for w in res["wait"])
    print(f"  gather wait per step (exposed): sync {sync:.1f} ms, overlapped {overlapped:.1f} ms")


if __name__ == "__main__":
    main()
