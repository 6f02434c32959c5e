"""2-rank scaling and where the step goes (`bench/run.py`, sections 2 and 3 of its docstring).

One Trainer step (pipeline engine, grad buffer, distributed optimizer) on 1 rank against DP2, TP2 (SP off
and on), PP2 (1F1B) and PP2 vp2 in forked ranks, one thread each. `StepClock` times every collective, p2p
wait, the DP grad wait and the optimizer exclusively; the PP rows give the bubble from the engine's own
op timings; rank 0's intercepted bytes are checked against megagpt.comm_model.
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagpt.comm_model import expected_comm_bytes, summary  # noqa: E402
from megagpt.config import config_from_dict  # noqa: E402
from megagpt.parallel.spawn import spawn  # noqa: E402

SCALING_MODEL = dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=1536,
                     vocab_size=4096, max_seq_len=64, make_vocab_divisible_by=128)
SCALING_TRAIN = dict(seq_len=64, micro_batch_size=1, global_batch_size=8, eval_interval=0, warmup=0)
LAYOUTS = {"1 rank": (1, {}), "DP2": (2, {}), "TP2": (2, dict(tp=2)),
           "TP2 (SP)": (2, dict(tp=2, sequence_parallel=True)), "PP2 (1F1B)": (2, dict(pp=2)),
           "PP2 vp2": (2, dict(pp=2, vp=2))}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- 2 + 3. scaling and overhead

class StepClock:
    """Exclusive wall and main-thread CPU time per category: a wrapped call's time minus the time of
    the wrapped calls nested in it (a collective inside a forward is comm, not compute)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.stack: list[list] = []

    @contextlib.contextmanager
    def section(self, category: str, detail: str | None = None):
        """Time the body as `category` (and `category:detail`), exclusive of nested sections."""
        self.stack.append([time.perf_counter(), time.thread_time(), 0.0, 0.0])
        try:
            yield
        finally:
            start, start_cpu, inner, inner_cpu = self.stack.pop()
            wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
            for key in (category, f"{category}:{detail}" if detail else None):
                if key:
                    self.totals[key] = self.totals.get(key, 0.0) + wall - inner
            self.totals[category + "_cpu"] = self.totals.get(category + "_cpu", 0.0) + cpu - inner_cpu
            if self.stack:
                self.stack[-1][2] += wall
                self.stack[-1][3] += cpu

    def wrap(self, obj, attr: str, category: str, label: str | None = None):
        """Time a public method of obj (an instance attribute shadows the method)."""
        fn = getattr(obj, attr)
        detail = f"{label or type(obj).__name__}.{attr}"                # e.g. comm_wait:tp.all_gather

        def timed(*args, **kwargs):
            with self.section(category, detail):
                return fn(*args, **kwargs)
        setattr(obj, attr, timed)

    def instrument(self, trainer):
        ps, opt, eng = trainer.ps, trainer.optimizer, trainer.engine
        groups = {id(g): g for g in [*ps.groups.values(), ps.embedding, opt.world]}.values()
        for g in groups:                     # the logged loss's all-reduce is one of these (ps.world)
            for name in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_reduce_async",
                         "all_gather_async", "reduce_scatter_async"):
                self.wrap(g, name, "comm_wait", g.name)
        self.wrap(opt.buffer, "finish_grad_sync", "comm_wait")   # waits for the DP buckets
        self.wrap(opt, "step", "optimizer")
        eng.timer = self.section             # the engine's own hook: F/B ops and p2p waits


def _scaling_worker(rank, world, raw, steps):
    from megagpt.train import Trainer
    cfg = config_from_dict(raw, world)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, run_dir=os.devnull)
    trainer.train_step()                                     # warm-up: Adam state, schedule caches
    clock = StepClock()
    clock.instrument(trainer)
    out = []
    for _ in range(steps):
        trainer.ps.counter.reset()
        clock.totals = {}
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        trainer.train_step()
        wall, cpu, main_cpu = time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0
        # cpu - main_cpu: gloo's own threads (copies and reductions of the async collectives)
        timeline = trainer.engine.timeline   # the engine's own op timings: (op, start, end, waited)
        pipe = {"pipe_start": timeline[0][1], "pipe_end": timeline[-1][2],
                "pipe_busy": sum(e - s - w for _, s, e, w in timeline)}
        out.append({"wall": wall, "cpu": cpu, "main_cpu": main_cpu, **pipe, **clock.totals})
    return {"steps": out, "comm_bytes": trainer.ps.counter.summary()}


def run_scaling(rounds: int, steps: int) -> dict:
    per_layout = {name: [] for name in LAYOUTS}
    for r in range(rounds):
        for name in (list(LAYOUTS) if r % 2 == 0 else list(LAYOUTS)[::-1]):
            world, par = LAYOUTS[name]
            raw = {"model": SCALING_MODEL, "parallel": par, "train": {**SCALING_TRAIN, "train_iters": steps + 1}}
            per_layout[name].append(spawn(world, _scaling_worker, raw, steps, timeout=600))
    tokens = SCALING_TRAIN["global_batch_size"] * SCALING_TRAIN["seq_len"]
    serial = [median([s["wall"] for s in res[0]["steps"]]) for res in per_layout["1 rank"]]
    serial_cpu = median([s["cpu"] for res in per_layout["1 rank"] for s in res[0]["steps"]])
    serial_compute_cpu = median([s["compute_cpu"] for res in per_layout["1 rank"] for s in res[0]["steps"]])
    out = {}
    for name, runs in per_layout.items():
        world, par = LAYOUTS[name]
        # a step ends when its slowest rank ends: the step time of a round is the max over ranks
        walls = [median([max(res[k]["steps"][i]["wall"] for k in range(world)) for i in range(steps)])
                 for res in runs]
        steps_all = [s for res in runs for rk in res for s in rk["steps"]]
        share = {c: median([s.get(c, 0.0) / s["wall"] for s in steps_all])
                 for c in ("compute", "comm_wait", "optimizer")}
        share["bookkeeping"] = median([1 - sum(s.get(c, 0.0) for c in share) / s["wall"] for s in steps_all])
        compute_cpu = median([s.get("compute_cpu", 0.0) for s in steps_all])
        cfg = config_from_dict({"model": SCALING_MODEL, "parallel": par, "train": SCALING_TRAIN}, world)
        predicted = summary(expected_comm_bytes(cfg, world, rank=0, backend="gloo"))
        # the bubble from the engine's op timings: from the first rank's first op to the last
        # rank's last op, less each rank's busy time (F/B minus their waits for input)
        bubbles = []
        for res in runs:
            for i in range(steps):
                ranks = [rk["steps"][i] for rk in res]
                span = max(r["pipe_end"] for r in ranks) - min(r["pipe_start"] for r in ranks)
                bubbles.append(sum((span - r["pipe_busy"]) / r["pipe_busy"] for r in ranks) / len(ranks))
        pp, vp = par.get("pp", 1), par.get("vp", 1)
        m = SCALING_TRAIN["global_batch_size"] // SCALING_TRAIN["micro_batch_size"] // (world // pp)
        out[name] = {
            "world": world, "step_s": median(walls), "tokens_per_s": tokens / median(walls),
            "speedup_vs_1_rank": median([a / b for a, b in zip(serial, walls)]),
            # CPU work of all ranks against the serial step's: > 1 means parallelism added work
            "cpu_work_vs_1_rank": median([sum(rk["steps"][i]["cpu"] for rk in res) for res in runs
                                          for i in range(steps)]) / serial_cpu,
            # a rank's forward/backward CPU time against the 1-rank run's split evenly: > 1 means
            # parallelism added compute work per rank (smaller GEMMs, replicated work), whatever the load
            "compute_cpu_vs_ideal": compute_cpu / (serial_compute_cpu / world),
            # the main thread off the CPU: blocked in a collective, or runnable but preempted
            "off_cpu_share": median([1 - s["main_cpu"] / s["wall"] for s in steps_all]),
            "gloo_threads_cpu_share": median([(s["cpu"] - s["main_cpu"]) / s["cpu"] for s in steps_all]),
            "share": share, "comm_wait_by_call_s": {k.split(":", 1)[1]: median([s.get(k, 0.0) for s in steps_all])
                                                    for k in sorted({k for s in steps_all for k in s})
                                                    if k.startswith("comm_wait:")},
            "comm_bytes_rank0": runs[-1][0]["comm_bytes"],
            "pipeline_bubble_measured": median(bubbles) if pp > 1 else None,
            "pipeline_bubble_ideal": (pp - 1) / (vp * m) if pp > 1 else None,
            "comm_bytes_rank0_predicted": predicted, "comm_bytes_match": runs[-1][0]["comm_bytes"] == predicted}
    return out


def print_scaling(res: dict) -> None:
    sc = res["scaling"]
    m = SCALING_MODEL
    print(f"\n== scaling: h={m['hidden_size']} L={m['num_layers']} seq={SCALING_TRAIN['seq_len']} "
          f"global batch {SCALING_TRAIN['global_batch_size']}, fp32, 1 thread per rank, one Trainer step")
    print(f"{'layout':11} {'step s':>7} {'tok/s':>7} {'speedup':>8} {'cpu work':>9} {'F/B cpu':>8} | {'compute':>8} "
          f"{'comm wait':>10} {'optimizer':>10} {'bookkeep':>9} | {'off cpu':>8} {'gloo cpu':>9} {'MB/step':>8} "
          f"| {'bubble':>6} {'(p-1)/vm':>8}")
    for name, r in sc.items():
        s = r["share"]
        print(f"{name:11} {r['step_s']:7.2f} {r['tokens_per_s']:7.0f} {r['speedup_vs_1_rank']:7.2f}x "
              f"{r['cpu_work_vs_1_rank']:8.2f}x {r['compute_cpu_vs_ideal']:7.2f}x | {100 * s['compute']:7.1f}% "
              f"{100 * s['comm_wait']:9.1f}% "
              f"{100 * s['optimizer']:9.1f}% {100 * s['bookkeeping']:8.1f}% | {100 * r['off_cpu_share']:7.1f}% "
              f"{100 * r['gloo_threads_cpu_share']:8.1f}% {sum(r['comm_bytes_rank0'].values()) / 2**20:8.1f} | "
              + (f"{r['pipeline_bubble_measured']:6.3f} {r['pipeline_bubble_ideal']:8.3f}"
                 if r["pipeline_bubble_measured"] is not None else f"{'':6} {'':8}")
              + ("" if r["comm_bytes_match"] else "  (differs from comm_model!)"))
    print("(speedup: tokens/s against 1 rank, bounded by 2 on 2 cores. cpu work: CPU seconds of all ranks against\n"
          " 1 rank's. F/B cpu: a rank's forward/backward CPU time (comm excluded) against 1 rank's / world size.\n"
          " compute .. bookkeep: shares of a rank's step wall time, timed exclusively. off cpu: share of the step\n"
          " the rank's main thread was not on a core (blocked in comm, or preempted by other processes).\n"
          " gloo cpu: share of the ranks' CPU time spent in gloo's own threads. MB/step: rank 0's counted bytes\n"
          " (= megagpt.comm_model's prediction unless flagged). bubble: the pipeline's idle share, from the\n"
          " engine's own op timings (span of the F/B ops over all ranks against each rank's busy time).\n"
          f" Load average (1 min) before/after: {res['machine']['load_avg']} on {res['machine']['cores']} cores)")
