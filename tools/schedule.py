"""Print a pipeline schedule: per-rank timeline chart, bubble fraction and peak activations.

    python tools/schedule.py --pp 4 --vp 2 --microbatches 8 [--kind gpipe|1f1b] [--tf 1 --tb 2] [--json]

--vp > 1 with --kind 1f1b gives Megatron's interleaved 1F1B. With --json the last line is one
JSON object (bubble_fraction, bubble_per_rank, peak_inflight, makespan, ...) for scripts. Bad
arguments print one error line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from megagpt.pipeline.schedule import ScheduleError, build_schedule, render, simulate


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
    parser.add_argument("--tf", type=float, default=1.0, help="forward time of a whole stage")
    parser.add_argument("--tb", type=float, default=2.0, help="backward time of a whole stage")
    parser.add_argument("--tcomm", type=float, default=0.0, help="latency of each p2p transfer")
    parser.add_argument("--width", type=int, default=None, help="chart columns (default: fit labels)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args(argv)
    if min(args.tf, args.tb) <= 0 or args.tcomm < 0:
        parser.error("--tf and --tb must be > 0 and --tcomm >= 0")
    if args.width is not None and args.width < 1:
        parser.error("--width must be positive")
    try:
        sim = simulate(build_schedule(args.kind, args.pp, args.vp, args.microbatches),
                       t_f=args.tf, t_b=args.tb, t_comm=args.tcomm)
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
    if args.json:
        print(json.dumps({
            "kind": "interleaved" if args.vp > 1 else args.kind, "pp": args.pp, "vp": args.vp,
            "microbatches": args.microbatches, "t_f": args.tf, "t_b": args.tb, "t_comm": args.tcomm,
            "makespan": sim.makespan, "bubble_fraction": sim.bubble_fraction,
            "bubble_per_rank": sim.bubble, "peak_inflight": sim.peak_inflight,
            "peak_inflight_stages": sim.peak_inflight_stages,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
