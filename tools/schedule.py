"""Print a pipeline schedule: per-rank timeline chart, bubble fraction and peak activations.

    python tools/schedule.py --pp 4 --vp 2 --microbatches 8 [--kind gpipe|1f1b] [--tf 1 --tb 2] [--json]
    python tools/schedule.py --pp 4 --vp 2 --microbatches 8 --measure [--tf 0.06 --tb 0.12] [--repeats 3]

--vp > 1 with --kind 1f1b gives Megatron's interleaved 1F1B. The simulation models the engine's
own waits (`schedule.simulate`). --measure also runs the real engine on pp forked ranks over
gloo, with model chunks that sleep t_f/vp and t_b/vp seconds (--tf/--tb are a whole stage's
seconds), and prints the measured bubble beside the simulated one and (p-1)/(v m); --wait batch
measures the old executor that waited on every p2p batch at once. With --json the last line is
one JSON object (bubble_fraction, bubble_per_rank, peak_inflight, makespan, and with --measure
measured_bubble, simulated_bubble, ideal_bubble) for scripts. Bad arguments print one error line
and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from megagpt.parallel.spawn import RankError
from megagpt.pipeline.bubble import measure_bubble
from megagpt.pipeline.schedule import ScheduleError, build_schedule
from megagpt.pipeline.simulate import render, simulate


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        print(f"schedule.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, required=True, help="pipeline-parallel ranks")
    parser.add_argument("--vp", type=int, default=1, help="model chunks per rank (interleaving)")
    parser.add_argument("--microbatches", "-m", type=int, required=True)
    parser.add_argument("--kind", choices=("gpipe", "1f1b"), default="1f1b")
    parser.add_argument("--tf", type=float, default=None,
                        help="forward time of a whole stage (default 1; with --measure, 0.06 s)")
    parser.add_argument("--tb", type=float, default=None,
                        help="backward time of a whole stage (default 2; with --measure, 0.12 s)")
    parser.add_argument("--tcomm", type=float, default=0.0, help="latency of each p2p transfer")
    parser.add_argument("--width", type=int, default=None, help="chart columns (default: fit labels)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--measure", action="store_true",
                        help="also time the real engine over gloo with sleeping chunks")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs with --measure (the best is reported)")
    parser.add_argument("--wait", choices=("deferred", "batch"), default="deferred",
                        help="with --measure: the engine's p2p waits (batch = the old blocking executor)")
    args = parser.parse_args(argv)
    if args.tf is None:
        args.tf = 0.06 if args.measure else 1.0
    if args.tb is None:
        args.tb = 0.12 if args.measure else 2.0
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    if args.measure and args.tcomm:
        parser.error("--tcomm is a simulation input; --measure times the real p2p")
    if min(args.tf, args.tb) <= 0 or args.tcomm < 0:
        parser.error("--tf and --tb must be > 0 and --tcomm >= 0")
    if args.width is not None and args.width < 1:
        parser.error("--width must be positive")
    try:
        sim = simulate(build_schedule(args.kind, args.pp, args.vp, args.microbatches),
                       t_f=args.tf, t_b=args.tb, t_comm=args.tcomm,
                       p2p="blocking" if args.wait == "batch" else "async")
    except ScheduleError as err:
        parser.error(str(err))

    name = "interleaved 1F1B" if args.vp > 1 else {"gpipe": "GPipe", "1f1b": "1F1B"}[args.kind]
    print(f"{name}: pp={args.pp} vp={args.vp} microbatches={args.microbatches} "
          f"t_f={args.tf:g} t_b={args.tb:g} makespan={sim.makespan:g}")
    print(render(sim, width=args.width))
    for rank in range(sim.pp):
        print(f"rank {rank}: bubble {sim.bubble[rank]:.4f}  peak in-flight {sim.peak_inflight[rank]} "
              f"chunk-microbatches = {sim.peak_inflight_stages[rank]:.3f} stages of activations")
    print(f"overall bubble fraction {sim.bubble_fraction:.4f} "
          f"((p-1)/(v*m) = {(args.pp - 1) / (args.vp * args.microbatches):.4f})")
    figures = {}
    if args.measure:
        print(f"measuring the engine: {args.pp} ranks over gloo, 1 warm-up + {args.repeats} timed runs ...",
              flush=True)
        try:
            got = measure_bubble(args.pp, args.vp, args.microbatches, args.tf, args.tb, kind=args.kind,
                                 wait_p2p=args.wait, repeats=args.repeats)
        except RankError as err:
            print(f"schedule.py: error: the measurement failed: {str(err).splitlines()[0]}", file=sys.stderr)
            return 1
        figures = {"measured_bubble": got["measured"], "measured_runs": got["measured_runs"],
                   "simulated_bubble": got["simulated"], "ideal_bubble": got["ideal"], "wait": args.wait}
        print(f"bubble: measured {got['measured']:.4f} (best of {args.repeats}: "
              f"{', '.join(f'{b:.4f}' for b in got['measured_runs'])})  simulated {got['simulated']:.4f}  "
              f"(p-1)/(v*m) {got['ideal']:.4f}")
    if args.json:
        print(json.dumps({**figures,
            "kind": "interleaved" if args.vp > 1 else args.kind, "pp": args.pp, "vp": args.vp,
            "microbatches": args.microbatches, "t_f": args.tf, "t_b": args.tb, "t_comm": args.tcomm,
            "makespan": sim.makespan, "bubble_fraction": sim.bubble_fraction,
            "bubble_per_rank": sim.bubble, "peak_inflight": sim.peak_inflight,
            "peak_inflight_stages": sim.peak_inflight_stages,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
