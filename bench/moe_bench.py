"""The cost of expert parallelism on the CPU: one MoE model on 2 gloo ranks (1 thread each), EP1 (dp 2,
every rank holds all 8 experts) against EP2 (dp 2, 4 experts per rank, tokens moved by all-to-all).

    python bench/moe_bench.py [--steps 12] [--json]

Per layout: the median train step (the Trainer's forward-backward and ZeRO-1 step, synthetic tokens),
and the bytes each collective moved per step on rank 0 (the Group counters: all-to-all included),
plus the expert weights and optimizer state per rank. Timings on 2 shared CPU cores are noisy: the
median of the steps after 2 warm-up steps, on the same machine, in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

RAW = {"model": dict(vocab_size=512, max_seq_len=128, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4,
                     ffn_hidden_size=256, make_vocab_divisible_by=1, moe_num_experts=8, moe_top_k=2,
                     moe_ffn_hidden_size=256, moe_aux_loss_coeff=0.01),
       "train": dict(seq_len=128, micro_batch_size=4, global_batch_size=16, train_iters=100, eval_interval=0,
                     log_interval=10 ** 6, peak_tflops=0.1)}


def _worker(rank, world, ep, steps):
    from megagpt.config import config_from_dict
    from megagpt.train import Trainer
    raw = json.loads(json.dumps(RAW))
    raw["parallel"] = {"ep": ep}
    trainer = Trainer(config_from_dict(raw, world_size=world), f"/tmp/megagpt-moe-bench-{os.getpid()}")
    times, comm = [], {}
    for i in range(steps):
        trainer.ps.counter.reset()
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
        comm = trainer.ps.counter.summary()
    expert = sum(p.numel() for c in trainer.chunks for p in c.parameters() if p.meta.expert)
    timed = sorted(times[2:])
    return {"ep": ep, "step_s_median": timed[len(timed) // 2], "step_s_min": timed[0], "comm_bytes": comm,
            "expert_params_per_rank": expert, "optimizer_bytes": trainer.optimizer.memory_bytes()["optimizer"]}


def main():
    from megagpt.parallel.spawn import spawn
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [spawn(2, _worker, ep, args.steps, timeout=1800)[0] for ep in (1, 2)]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'layout':<12} {'step s (median)':>16} {'min':>8} {'expert params/rank':>19} {'optimizer MB':>13}  "
          f"bytes per step (rank 0)")
    for r in rows:
        comm = ", ".join(f"{k} {v / 2 ** 20:.2f} MiB" for k, v in r["comm_bytes"].items())
        print(f"{'EP' + str(r['ep']) + ' x DP2':<12} {r['step_s_median']:>16.3f} {r['step_s_min']:>8.3f} "
              f"{r['expert_params_per_rank']:>19,} {r['optimizer_bytes'] / 2 ** 20:>13.2f}  {comm}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
