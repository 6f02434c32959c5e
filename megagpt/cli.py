"""The command line shared by examples/pretrain.py and examples/pretrain_70b.py."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoint.store import CheckpointError
from .config import ConfigError, load_config
from .data.indexed import DataError


def parse_args(argv=None, default_config: str | None = None):
    ap = argparse.ArgumentParser(description="megagpt pretraining")
    ap.add_argument("--config", default=default_config, help="YAML config")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--vp", type=int)
    ap.add_argument("--world-size", type=int, help="dry run: the world to plan for (default: from the launcher)")
    ap.add_argument("--train-iters", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--data", help="prefix of a preprocessed .bin/.idx pair (default: synthetic tokens)")
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--save-interval", type=int)
    ap.add_argument("--load", help="a run directory (or checkpoint directory) to resume from")
    ap.add_argument("--dry-run", action="store_true", help="build on the meta device and count; no training")
    ap.add_argument("--json", action="store_true", help="dry run: print one JSON object as the last line")
    ap.add_argument("overrides", nargs="*", help="dotted overrides: model.num_layers=4 train.lr=1e-3")
    args = ap.parse_intermixed_args(argv)  # overrides may sit between flags
    return args


def build_config(args, world_size: int | None):
    overrides = list(args.overrides)
    for flag, key in (("tp", "parallel.tp"), ("pp", "parallel.pp"), ("vp", "parallel.vp"),
                      ("train_iters", "train.train_iters"), ("seed", "train.seed"),
                      ("save_interval", "train.save_interval"), ("data", "data.path")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides, world_size=world_size)


def plan_layout(args, world: int) -> None:
    """Flagship runs: with no --tp/--pp given, the planner picks the fastest layout that fits `world`
    GPUs (H100 80 GB by default); with one given, refuse it with the breakdown if it cannot fit."""
    from .planner import choose_layout, rank_layouts
    probe = build_config(args, None)
    t = probe.train
    if args.tp is None and args.pp is None:
        best = choose_layout(probe.model, world, t.seq_len, t.global_batch_size)
        if not best["fits"]:
            raise ConfigError(f"parallel: no layout of {world} GPUs fits; the closest needs "
                              f"{best['memory_gb']:.1f} GB per GPU: {_breakdown(best)}")
        args.tp, args.pp, args.vp = best["tp"], best["pp"], best["vp"]
        args.overrides += [f"parallel.sequence_parallel={str(best['sp']).lower()}",
                           f"train.recompute={best['recompute']}", f"train.micro_batch_size={best['micro_batch']}"]
        print(f"planner: chose tp={best['tp']} pp={best['pp']} vp={best['vp']} dp={best['dp']} "
              f"sp={best['sp']} recompute={best['recompute']} micro_batch={best['micro_batch']} for {world} GPUs: "
              f"{best['memory_gb']:.1f} GB per GPU ({_breakdown(best)}), predicted MFU {100 * best['mfu']:.1f}%")
        return
    p = probe.parallel
    fits, closest = rank_layouts(probe.model, world, t.seq_len, t.global_batch_size, tp=args.tp or p.tp,
                                 pp=args.pp or p.pp, vp=args.vp or p.vp)
    if not fits and closest is not None:
        raise ConfigError(f"parallel: tp={args.tp or p.tp} pp={args.pp or p.pp} does not fit on {world} GPUs: "
                          f"{closest['memory_gb']:.1f} GB per GPU ({_breakdown(closest)})")


def _breakdown(entry: dict) -> str:
    b = entry["memory_breakdown"]
    return ", ".join(f"{k} {b[k]:.1f}" for k in ("weights", "grads", "optimizer", "activations"))


def main(argv=None, default_config: str | None = None, use_planner: bool = False) -> int:
    args = parse_args(argv, default_config)
    try:
        if args.dry_run:
            world = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or None
            if use_planner:  # 70B fits no single node: plan for 8 nodes of 8 unless told otherwise
                world = world or 64
                plan_layout(args, world)
            if world is None:  # the layout in the config with dp = 1
                probe = build_config(args, None)
                world = probe.parallel.tp * probe.parallel.pp
            cfg = build_config(args, world)
            from .dryrun import dry_run
            report = dry_run(cfg, world)
            print_dry_run(report)
            if args.json:
                print(json.dumps(report))
            return 0
        from .train import train_main
        if use_planner:
            world = int(os.environ.get("WORLD_SIZE", 1))
            plan_layout(args, world)
        return train_main(args, build_config)
    except (ConfigError, DataError, CheckpointError) as e:  # bad input, named in one line, before any step
        print(f"error: {e}", file=sys.stderr)
        return 2


def print_dry_run(r: dict) -> None:
    lay = r["layout"]
    print(f"layout: tp={lay['tp']} pp={lay['pp']} vp={lay['vp']} dp={lay['dp']} world={lay['world_size']} "
          f"sp={lay['sequence_parallel']}")
    if r.get("vocab_padding"):
        print(f"note: {r['vocab_padding']}")
    print(f"params_total: {r['params_total']}")
    print(f"params_total_padded: {r['params_total_padded']}")
    for stage, n in enumerate(r["params_per_rank"]):
        print(f"  pp stage {stage}: {n} params per rank ({n / 1e9:.3f} B)")
    if "bytes_per_rank" in r:
        b = r["bytes_per_rank"]
        print("bytes per rank (most loaded): " + ", ".join(
            f"{k} {b[k] / 2**30:.2f} GiB" for k in ("weights", "grads", "optimizer", "activations") if k in b))
