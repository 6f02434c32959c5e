"""The command line shared by examples/pretrain.py and examples/pretrain_70b.py.

One straight flow: parse the flags, resolve the whole Config once (the YAML, the dotted overrides, the
flags, the model vocab from the data's tokenizer and, for the flagship, the planner's layout), then hand
it to the dry run or the trainer. After resolve_config only --run-dir and --load are read from the flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoint.store import CheckpointError
from .config import Config, ConfigError, config_from_dict, load_config, load_raw, overlay_overrides
from .data.blend import blend_parts
from .data.indexed import DataError, fit_model_vocab

# flag -> the config field it sets; a flag wins over a dotted override of the same field
FLAGS = (("tp", "parallel.tp"), ("cp", "parallel.cp"), ("pp", "parallel.pp"), ("vp", "parallel.vp"), ("train_iters", "train.train_iters"),
         ("seed", "train.seed"), ("save_interval", "train.save_interval"), ("data", "data.path"))


def parse_args(argv=None, default_config: str | None = None):
    ap = argparse.ArgumentParser(description="megagpt pretraining")
    ap.add_argument("--config", default=default_config, help="YAML config")
    ap.add_argument("--overlay", action="append", default=[],
                    help="YAML overlay applied over --config (before dotted overrides), e.g. a context extension")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--cp", type=int, help="context parallelism: each sequence split over cp ranks (zigzag)")
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


def resolve_config(args, world: int | None, use_planner: bool = False) -> Config:
    """The run's whole Config. world None (a dry run told no world size) is the config's own tp*pp, dp = 1."""
    overrides = [o for path in args.overlay for o in overlay_overrides(path)]
    overrides += list(args.overrides) + [f"{key}={getattr(args, flag)}" for flag, key in FLAGS
                                        if getattr(args, flag) is not None]
    overrides += data_vocab(args.config, overrides)
    probe = load_config(args.config, overrides)  # validated without the world
    if use_planner:
        overrides += plan_layout(probe, world, layout_given=any(getattr(args, k) is not None
                                                                               for k in ("tp", "cp", "pp")))
        probe = load_config(args.config, overrides)
    if world is None:
        world = probe.parallel.tp * probe.parallel.cp * probe.parallel.pp * probe.parallel.ep
    return load_config(args.config, overrides, world_size=world)


def data_vocab(config_path: str | None, overrides: list[str]) -> list[str]:
    """Megatron takes the vocab from the tokenizer: with data and no model.vocab_size given, the model
    follows the data's tokenizer; a given one is checked against it (indexed.fit_model_vocab)."""
    raw = load_raw(config_path, overrides)
    probe = config_from_dict(raw)
    _, prefixes = blend_parts(probe.data.blend, probe.data.path)
    if not prefixes:
        return []
    given = "vocab_size" in (raw.get("model") or {})
    vocab = fit_model_vocab(prefixes, probe.model.vocab_size if given else None)
    if given:
        return []
    if os.environ.get("RANK", "0") == "0":
        print(f"note: model.vocab_size unset: {vocab}, the vocab of the data's tokenizer", flush=True)
    return [f"model.vocab_size={vocab}"]


def plan_layout(probe: Config, world: int, layout_given: bool) -> list[str]:
    """Flagship runs: with no --tp/--pp given, the planner picks the fastest layout that fits `world`
    GPUs (H100 80 GB by default) and returns it as overrides; with one given, refuse it with the
    breakdown if it cannot fit."""
    from .planner import choose_layout, rank_layouts
    if world < 1:  # named as the field it becomes, not as the planner's argument
        raise ConfigError(f"parallel.world_size: expected a positive integer, got {world}")
    t, p = probe.train, probe.parallel
    if not layout_given:
        best = choose_layout(probe.model, world, t.seq_len, t.global_batch_size)
        if not best["fits"]:
            raise ConfigError(f"parallel: no layout of {world} GPUs fits; the closest needs "
                              f"{best['memory_gb']:.1f} GB per GPU: {_breakdown(best)}")
        print(f"planner: chose tp={best['tp']} cp={best['cp']} pp={best['pp']} vp={best['vp']} dp={best['dp']} "
              f"ep={best.get('ep', 1)} "
              f"sp={best['sp']} recompute={best['recompute']} micro_batch={best['micro_batch']} for {world} GPUs: "
              f"{best['memory_gb']:.1f} GB per GPU ({_breakdown(best)}), predicted MFU {100 * best['mfu']:.1f}%")
        return [f"parallel.tp={best['tp']}", f"parallel.cp={best['cp']}", f"parallel.pp={best['pp']}", f"parallel.vp={best['vp']}",
                f"parallel.sequence_parallel={str(best['sp']).lower()}", f"train.recompute={best['recompute']}",
                f"train.micro_batch_size={best['micro_batch']}", f"parallel.ep={best.get('ep', 1)}"]
    fits, closest = rank_layouts(probe.model, world, t.seq_len, t.global_batch_size, tp=p.tp, cp=p.cp, pp=p.pp,
                                 vp=p.vp)
    if not fits and closest is not None:
        raise ConfigError(f"parallel: tp={p.tp} cp={p.cp} pp={p.pp} does not fit on {world} GPUs: "
                          f"{closest['memory_gb']:.1f} GB per GPU ({_breakdown(closest)})")
    return []


def _breakdown(entry: dict) -> str:
    b = entry["memory_breakdown"]
    return ", ".join(f"{k} {b[k]:.1f}" for k in ("weights", "grads", "optimizer", "activations"))


def main(argv=None, default_config: str | None = None, use_planner: bool = False) -> int:
    args = parse_args(argv, default_config)
    try:
        if args.dry_run:
            world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 0)) or None
            if use_planner and world is None:  # 70B fits no single node: plan for 8 nodes of 8 unless told otherwise
                world = 64
            cfg = resolve_config(args, world, use_planner)
            from .dryrun import dry_run
            report = dry_run(cfg, cfg.parallel.world_size)
            print_dry_run(report)
            if args.json:
                print(json.dumps(report))
            return 0
        cfg = resolve_config(args, launcher_world(), use_planner)
        from .train import train_main
        return train_main(cfg, args.run_dir, args.load)
    except (ConfigError, DataError, CheckpointError) as e:  # bad input, named in one line, before any step
        print(f"error: {with_flag(str(e), args)}", file=sys.stderr)
        return 2


def launcher_world() -> int:
    """The world the launcher started (torchrun and spawn set WORLD_SIZE; plain python is a world of 1)."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def with_flag(message: str, args) -> str:
    """`train.train_iters: expected >= 1, got -5` -> `... (from --train-iters)` when that flag set it."""
    for flag, key in FLAGS + (("world_size", "parallel.world_size"),):
        if getattr(args, flag, None) is not None and message.startswith(key + ":"):
            return f"{message} (from --{flag.replace('_', '-')})"
    return message


def print_dry_run(r: dict) -> None:
    lay = r["layout"]
    print(f"layout: tp={lay['tp']} cp={lay['cp']} pp={lay['pp']} vp={lay['vp']} dp={lay['dp']} ep={lay.get('ep', 1)} "
          f"world={lay['world_size']} "
          f"sp={lay['sequence_parallel']}")
    if r.get("vocab_padding"):
        print(f"note: {r['vocab_padding']}")
    print(f"params_total: {r['params_total']}" + (f" (active per token: {r['params_active']})"
                                                   if r.get("params_active", r["params_total"]) != r["params_total"] else ""))
    print(f"params_total_padded: {r['params_total_padded']}")
    for stage, n in enumerate(r["params_per_rank"]):
        print(f"  pp stage {stage}: {n} params per rank ({n / 1e9:.3f} B)")
    if "bytes_per_rank" in r:
        b = r["bytes_per_rank"]
        print("bytes per rank (most loaded): " + ", ".join(
            f"{k} {b[k] / 2**30:.2f} GiB" for k in ("weights", "grads", "optimizer", "activations") if k in b))
