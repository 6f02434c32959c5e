"""The issue-18 shape on the CPU: where one process's step goes, and megagpt's layouts side by side.

Model: Llama shape, hidden 256, 8 layers, 8 heads / 2 KV, SwiGLU 704, vocab 8192, untied, fp32,
seq 256; a step is 8 sequences (micro batch 2, so 4 microbatches in one process). Every run is one
`Trainer.train_step` (pipeline engine, grad buffer, distributed optimizer) on forked ranks.

    python bench/one_process.py --profile            # one process: ms per part + the top ops
    python bench/one_process.py --layouts            # 1p 2 threads (baseline), 1p 1 thread, DP2, TP2, TP2+SP,
                                                     # PP2 vp1, PP2 vp2; rounds alternate the order
    python bench/one_process.py --compile            # 1 process, train.compile off vs on (1 and 2 threads)

Each layout's figure is the median tokens/s over its timed steps and rounds, with the min and max
of the per-round medians (the spread); ratios against the 1-process 2-thread baseline are per round.
Results: bench/out/one_process.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagpt.config import config_from_dict  # noqa: E402
from megagpt.parallel.spawn import spawn  # noqa: E402

MODEL = dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=2, ffn_hidden_size=704, vocab_size=8192,
             tie_embeddings=False, max_seq_len=256, make_vocab_divisible_by=128, use_flash_attn=False)
TRAIN = dict(seq_len=256, micro_batch_size=2, global_batch_size=8, eval_interval=0, warmup=0, log_interval=1)
# name: (world, threads per rank, parallel overrides)
LAYOUTS = {"1p 2 threads": (1, 2, {}), "1p 1 thread": (1, 1, {}), "DP2": (2, 1, {}),
           "TP2": (2, 1, dict(tp=2)), "TP2 + SP": (2, 1, dict(tp=2, sequence_parallel=True)),
           "PP2 vp1": (2, 1, dict(pp=2)), "PP2 vp2": (2, 1, dict(pp=2, vp=2))}
BASELINE = "1p 2 threads"
COMPILED = " +compile"                 # a layout name + this suffix: the same with train.compile: true


def raw_config(par: dict, steps: int, train: dict | None = None) -> dict:
    return {"model": MODEL, "parallel": par, "train": {**TRAIN, "train_iters": steps + 10, **(train or {})}}


def _optimizer_parts(opt, clock: dict) -> None:
    """Time the optimizer's parts (grad sync, finalize, norm, clip, AdamW, param gather) in `clock`."""
    import megagpt.optim.optimizer as om

    def timed(fn, key):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock[key] = clock.get(key, 0.0) + time.perf_counter() - t
        return run
    opt.buffer.finish_grad_sync = timed(opt.buffer.finish_grad_sync, "opt: grad sync")
    opt.update.step = timed(opt.update.step, "opt: adamw")
    opt.update.start_param_gather = timed(opt.update.start_param_gather, "opt: param gather")
    for name, key in (("finalize_grads", "opt: finalize"), ("global_norm", "opt: norm"), ("clip_", "opt: clip")):
        setattr(om, name, timed(getattr(om, name), key))


def _worker(rank, world, raw, steps, threads, profile=False):
    from megagpt.train import Trainer
    torch.set_num_threads(threads)
    cfg = config_from_dict(raw, world)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, run_dir=os.devnull)
    t0 = time.perf_counter()
    for _ in range(2):                                       # warm-up: Adam state, caches, compilation
        trainer.train_step()
    warm_s = time.perf_counter() - t0
    clock: dict = {}
    _optimizer_parts(trainer.optimizer, clock)
    out = []
    for _ in range(steps):
        clock.clear()
        t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        stats = trainer.train_step()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        f1 = resource.getrusage(resource.RUSAGE_SELF)
        faults, sys_s = f1.ru_minflt - f0.ru_minflt, f1.ru_stime - f0.ru_stime   # page faults, system CPU
        ops = trainer.engine.timeline
        parts = {"F (fwd + loss + data)": sum(e - s for op, s, e, _ in ops if op.kind == "F"),
                 "B (backward)": sum(e - s for op, s, e, _ in ops if op.kind == "B")}
        opt = dict(clock)
        out.append({"wall": wall, "cpu": cpu, "faults": faults, "sys": sys_s, "loss": stats["loss"], **parts, **opt})
    res = {"steps": out, "warm_s": warm_s, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if profile:
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                trainer.train_step()
        res["ops"] = {e.key: e.self_cpu_time_total / 1e3 / 2 for e in prof.key_averages()}
    return res


def run_layout(name: str, steps: int, train: dict | None = None, profile=False) -> dict:
    if name.endswith(COMPILED):
        name, train = name[:-len(COMPILED)], {**(train or {}), "compile": True}
    world, threads, par = LAYOUTS[name]
    res = spawn(world, _worker, raw_config(par, steps, train), steps, threads, profile, timeout=900)
    walls = [max(r["steps"][i]["wall"] for r in res) for i in range(steps)]  # a step ends with its slowest rank
    cpus = [sum(r["steps"][i]["cpu"] for r in res) for i in range(steps)]    # CPU seconds of all ranks
    per_rank = {k: statistics.median(r["steps"][i][k] for r in res for i in range(steps)) for k in ("cpu", "faults", "sys")}
    per_rank["rss_mb"] = max(r["rss_mb"] for r in res)
    return {"walls": walls, "cpus": cpus, "ranks": res, "per_rank": per_rank}


def ab_main(field: str, names: list[str], rounds: int, steps: int) -> dict:
    """train.<field> false against true in each layout (field: one or more train fields, comma-separated, all
    set alike), arms alternated round by round: the median step's wall, and per rank and step (median) the
    process CPU, the system CPU and the minor page faults."""
    fields = field.split(",")
    out = {}
    for n in names:
        arms = {False: [], True: []}
        for r in range(rounds):
            for arm in ((False, True) if r % 2 == 0 else (True, False)):
                res = run_layout(n, steps, dict.fromkeys(fields, arm))
                arms[arm].append({"wall": statistics.median(res["walls"]), **res["per_rank"],
                                  "load": os.getloadavg()[0]})
                a = arms[arm][-1]
                print(f"  {n:14} {field}={arm!s:5} wall {a['wall'] * 1e3:6.0f} ms  CPU/rank {a['cpu'] * 1e3:6.0f} ms  "
                      f"sys {a['sys'] * 1e3:5.0f} ms  faults {a['faults']:7.0f}  RSS {a['rss_mb']:4.0f} MB  "
                      f"load {a['load']:.1f}", flush=True)
        out[n] = {str(arm): {k: statistics.median(x[k] for x in v) for k in v[0]} | {"rounds": v}
                  for arm, v in arms.items()}
        off, on = out[n]["False"], out[n]["True"]
        print(f"{n:14} CPU/rank off {off['cpu'] * 1e3:.0f} on {on['cpu'] * 1e3:.0f} ms ({on['cpu'] / off['cpu'] - 1:+.1%}); "
              f"wall off {off['wall'] * 1e3:.0f} on {on['wall'] * 1e3:.0f} ms; faults {off['faults']:.0f} -> {on['faults']:.0f}; "
              f"RSS {off['rss_mb']:.0f} -> {on['rss_mb']:.0f} MB")
    return out


def summarize(walls_by_round: list[list[float]], tokens: int) -> dict:
    meds = [statistics.median(w) for w in walls_by_round]
    allw = [x for w in walls_by_round for x in w]
    return {"tokens_per_s": tokens / statistics.median(allw), "tok_s_min": tokens / max(meds),
            "tok_s_max": tokens / min(meds), "rounds": len(meds)}


def profile_main(steps: int, threads_names=("1p 2 threads", "1p 1 thread"), train=None) -> dict:
    out = {}
    for name in threads_names:
        r = run_layout(name, steps, train, profile=True)["ranks"][0]
        keys = [k for k in r["steps"][0] if k not in ("loss", "faults")]
        parts = {k: 1e3 * statistics.median([s.get(k, 0.0) for s in r["steps"]]) for k in keys}
        opt_total = sum(v for k, v in parts.items() if k.startswith("opt: "))
        parts["other (zero_grad, loss all-reduce, loop)"] = parts["wall"] - parts["F (fwd + loss + data)"] \
            - parts["B (backward)"] - opt_total
        faults = statistics.median(s["faults"] for s in r["steps"])
        print(f"\n== one process, {name}: ms per step (median of {steps}); rss {r['rss_mb']:.0f} MB; "
              f"{faults:.0f} minor page faults a step")
        for k, v in parts.items():
            print(f"  {k:42} {v:8.1f}")
        top = sorted(r["ops"].items(), key=lambda kv: -kv[1])[:18]
        print("  top ops (self CPU ms per step, as the profiler counts them):")
        for k, v in top:
            print(f"    {k[:50]:50} {v:8.1f}")
        out[name] = {"parts_ms": parts, "top_ops_ms": dict(top), "rss_mb": r["rss_mb"]}
    return out


def layouts_main(names: list[str], rounds: int, steps: int, train=None) -> dict:
    tokens = TRAIN["global_batch_size"] * TRAIN["seq_len"]
    walls = {n: [] for n in names}
    rss = {n: [] for n in names}
    cpus = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            res = run_layout(n, steps, train)
            walls[n].append(res["walls"])
            cpus[n].append(statistics.median(res["cpus"]))
            rss[n].append(max(x["rss_mb"] for x in res["ranks"]))
            print(f"  round {r} {n:14} median step {statistics.median(res['walls']):.3f} s", flush=True)
    out = {}
    base = [statistics.median(w) for w in walls[names[0]]]
    for n in names:
        meds = [statistics.median(w) for w in walls[n]]
        ratios = [b / m for b, m in zip(base, meds)]
        out[n] = {**summarize(walls[n], tokens), "vs_baseline": statistics.median(ratios),
                  "vs_baseline_min": min(ratios), "vs_baseline_max": max(ratios), "rss_mb_max": max(rss[n]),
                  "cpu_s_per_step": statistics.median(cpus[n]), "cpu_s_rounds": cpus[n]}
    print(f"\n{'layout':16} {'tok/s':>7} {'[min, max]':>14} {'vs ' + names[0]:>18} {'[min, max]':>14} {'RSS MB':>7} {'CPU s':>6}")
    for n, o in out.items():
        print(f"{n:16} {o['tokens_per_s']:7.0f} [{o['tok_s_min']:5.0f}, {o['tok_s_max']:5.0f}] "
              f"{o['vs_baseline']:17.3f}x [{o['vs_baseline_min']:.2f}, {o['vs_baseline_max']:.2f}] {o['rss_mb_max']:7.0f} {o['cpu_s_per_step']:6.2f}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--layouts", nargs="*", metavar="NAME",
                    help=f"subset of {list(LAYOUTS)}, each optionally + '{COMPILED}' (default: all, eager)")
    ap.add_argument("--compile", action="store_true", help="1 process, 1 and 2 threads: train.compile off vs on")
    ap.add_argument("--ab", metavar="FIELD", help="with --layouts: train.FIELD false against true, alternated "
                                                  "(FIELD[,FIELD...]: several switched together)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "one_process.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)            # forked ranks need a one-thread parent
    res = {"model": MODEL, "train": TRAIN, "torch": torch.__version__, "cores": os.cpu_count(),
           "load_avg_before": os.getloadavg()[0]}
    if args.profile:
        res["profile"] = profile_main(args.steps)
    if args.ab:
        res["ab_" + args.ab] = ab_main(args.ab, args.layouts or list(LAYOUTS), args.rounds, args.steps)
    elif args.layouts is not None:
        res["layouts"] = layouts_main(args.layouts or list(LAYOUTS), args.rounds, args.steps)
    if args.compile:
        names = ["1p 1 thread", "1p 1 thread" + COMPILED, "1p 2 threads", "1p 2 threads" + COMPILED]
        res["compile"] = layouts_main(names, args.rounds, args.steps)
    res["load_avg_after"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    old = json.load(open(args.out)) if os.path.exists(args.out) else {}
    old.update(res)
    with open(args.out, "w") as f:
        json.dump(old, f, indent=1)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
