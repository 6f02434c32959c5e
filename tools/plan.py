#!/usr/bin/env python
"""Pick a parallel layout: rank every (tp, cp, pp, vp, dp, micro batch, SP, recompute) that fits by
predicted throughput (see megagpt/planner.py for the time model and megagpt/memory.py for memory).

  python tools/plan.py --config examples/configs/gpt4plus-70b.yaml --gpus 1024 [--seq-len 8192]
                       [--global-batch 1024] [--json] [--top 10] [--explain]
  python tools/plan.py --config ... --gpus 64 --tp 8 --pp 8 --vp 1     # check one layout (exit 1 if it does not fit)
  python tools/plan.py --flagship      # gpt4plus-70b on 8..1024 H100s at seq 8192 and 32768
  python tools/plan.py --validate      # predictions vs Narayanan et al. 2021 Table 1
Exit codes: 0 ok, 1 nothing fits (the closest layout's breakdown is printed), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megagpt.config import ConfigError, load_config  # noqa: E402
from megagpt.model_size import active_params, count_params  # noqa: E402
from megagpt.planner import (Cluster, a100_selene, flagship, gpt4plus_70b, rank_layouts,  # noqa: E402
                             validate_narayanan2021)

def public(p: dict) -> dict:
    """The fields of a prediction that go into the JSON output."""
    keys = ("tp", "cp", "pp", "vp", "dp", "ep", "sp", "recompute", "micro_batch", "num_microbatches", "memory_gb",
            "tflops_per_gpu", "mfu", "step_time_s", "tokens_per_s", "memory_breakdown", "time_breakdown")
    return {k: p[k] for k in keys}


def row_line(p: dict) -> str:
    return (f"{p['tp']:>3} {p['cp']:>3} {p['pp']:>3} {p['vp']:>3} {p['dp']:>5} {'on' if p['sp'] else 'off':>3} {p['recompute']:>9} "
            f"{p['micro_batch']:>3} {p['num_microbatches']:>5} {p['memory_gb']:>7.1f} {p['tflops_per_gpu']:>7.1f} "
            f"{100 * p['mfu']:>5.1f} {p['step_time_s']:>9.3f} {p['tokens_per_s']:>11.0f}"
            + (f" {p['ep']:>3}" if p.get("ep", 1) > 1 else ""))


def header() -> str:
    return " tp  cp  pp  vp    dp  sp recompute  mb    m  mem_GiB  TFLOP/s  MFU%    step_s    tokens/s  (ep)"


def explain(p: dict, out=sys.stdout) -> None:
    """The memory breakdown (GiB, most loaded GPU) and the step-time breakdown (s and share)."""
    mb = p["memory_breakdown"]
    print(f"memory per GPU (pp rank {mb['pp_rank']}, {mb['params_on_rank'] / 1e9:.2f}B params): "
          + ", ".join(f"{k} {mb[k]:.1f}" for k in ("weights", "grads", "optimizer", "activations", "total"))
          + " GiB", file=out)
    tb, total = p["time_breakdown"], p["step_time_s"]
    print(f"step time {total:.3f} s: " + ", ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)"
                                                  for k, v in tb.items() if v > 0), file=out)


def cluster_from(a) -> Cluster:
    c = Cluster()
    for field in ("gpus_per_node", "peak_tflops", "hbm_gb", "hbm_tbps", "nvlink_gbps", "network_gbps", "gemm_eff"):
        v = getattr(a, field)
        if v is not None:
            if v <= 0:
                raise ConfigError(f"--{field.replace('_', '-')}: expected a positive number, got {v}")
            c = dataclasses.replace(c, **{field: v})
    return c


def run_validate() -> int:
    print("Narayanan et al. 2021 Table 1 (A100): published vs predicted TFLOP/s per GPU")
    print("params_B (ours)  tp  pp  vp  mb  GPUs  batch  published  predicted   error")
    for r in validate_narayanan2021(a100_selene()):
        print(f"{r['params_b']:>8} ({r['params_predicted_b']:7.2f}) {r['tp']:>3} {r['pp']:>3} {r['vp']:>3} "
              f"{r['micro_batch']:>3} {r['gpus']:>5} {r['batch']:>6} {r['tflops']:>10} {r['predicted']:>10.1f} "
              f"{100 * r['error']:>+6.1f}%")
    return 0


def run_flagship(c: Cluster, as_json: bool) -> int:
    rows = flagship(c)
    print(f"gpt4plus-70b on {c.name}, global batch 8M tokens")
    print(f"{'GPUs':>5} {'seq':>6} {'batch':>5} fits " + header())
    for r in rows:
        fits = "yes" if r["fits"] else " NO"
        print(f"{r['gpus']:>5} {r['seq_len']:>6} {r['global_batch']:>5} {fits}  " + row_line(r))
        explain(r)
    if as_json:
        print(json.dumps({"model": "gpt4plus-70b", "flagship": [
            {k: r[k] for k in ("gpus", "seq_len", "global_batch", "fits")} | public(r) for r in rows]}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="model YAML (megagpt.config); default: gpt4plus-70b")
    ap.add_argument("--gpus", type=int)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--global-batch", type=int, default=1024, help="sequences per step")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="the ranking as one JSON object on the last line")
    ap.add_argument("--explain", action="store_true", help="memory and time breakdown of the winner")
    for k in ("tp", "cp", "pp", "vp", "micro-batch"):
        ap.add_argument(f"--{k}", type=int, help="fix this dimension")
    ap.add_argument("--recompute", choices=("none", "selective", "full"))
    ap.add_argument("--sp", dest="sp", action="store_true", default=None)
    ap.add_argument("--no-sp", dest="sp", action="store_false")
    for k in ("gpus-per-node",):
        ap.add_argument(f"--{k}", type=int)
    for k in ("peak-tflops", "hbm-gb", "hbm-tbps", "nvlink-gbps", "network-gbps", "gemm-eff"):
        ap.add_argument(f"--{k}", type=float)
    ap.add_argument("--flagship", action="store_true")
    ap.add_argument("--validate", action="store_true")
    a = ap.parse_args(argv)
    try:
        c = cluster_from(a)
        if a.validate:
            return run_validate()
        if a.flagship:
            return run_flagship(c, a.json)
        if not a.gpus or a.gpus <= 0:
            raise ConfigError("--gpus: expected a positive number of GPUs")
        for name in ("seq_len", "global_batch", "top"):
            if getattr(a, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(a, name)}")
        m = load_config(a.config).model if a.config else gpt4plus_70b()
        name = Path(a.config).stem if a.config else "gpt4plus-70b"
        fixed = dict(tp=a.tp, cp=a.cp, pp=a.pp, vp=a.vp, micro_batch=a.micro_batch, sp=a.sp, recompute=a.recompute)
        fits, closest = rank_layouts(m, a.gpus, a.seq_len, a.global_batch, c, **fixed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    active = f" ({active_params(m) / 1e9:.2f}B active)" if m.moe_num_experts else ""
    print(f"{name}: {count_params(m) / 1e9:.2f}B params{active}, {a.gpus} x {c.name}, seq {a.seq_len}, "
          f"global batch {a.global_batch}; {len(fits)} layouts fit in {c.reserve:.0%} of {c.hbm_gb:g} GiB")
    if not fits:
        if closest is None:
            print(f"error: gpus: no layout of {a.gpus} GPUs matches the model, the batch and the fixed dimensions",
                  file=sys.stderr)
            return 2
        print("REFUSED: no layout fits; the closest:")
        print(header())
        print(row_line(closest))
        explain(closest)
        if a.json:
            print(json.dumps({"model": name, "gpus": a.gpus, "ranking": [],
                              "closest": public(closest)}))
        return 1
    print(header())
    for p in fits[:a.top]:
        print(row_line(p))
    if a.explain:
        print("winner:")
        explain(fits[0])
    if a.json:
        print(json.dumps({"model": name, "gpus": a.gpus, "seq_len": a.seq_len, "global_batch": a.global_batch,
                          "ranking": [public(p) for p in fits[:a.top]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
