"""CPU benchmarks (`make bench`): megagpt against transformers' Llama, 2-rank scaling, and where step time goes.

1. peer:     one process, one thread, fp32, torch.optim.AdamW on both sides: megagpt's GPTModel
             against LlamaForCausalLM built offline from `to_hf_config` and loaded with the same
             weights (the first-step losses are compared, so both run the same model). ~10M and
             ~100M parameters, activation recompute off and on (full layer on both; megagpt's
             selective recompute is an extra row against HF without recompute).
2. scaling:  one Trainer step (pipeline engine, grad buffer, distributed optimizer) on 1 rank
             against DP2, TP2 (SP off and on), PP2 (1F1B) and PP2 vp2 (interleaved) in forked ranks, one
             thread each; the PP rows give the bubble measured from the engine's own op timings.
3. overhead: inside those steps, timers wrapped around every collective, p2p batch, the DP grad
             wait and the loss all-reduce ("comm wait"), the pipeline's F/B ops ("compute") and the
             optimizer step, each timed exclusively (a nested call's time belongs to the inner
             category); "bookkeeping" is the rest of the step (schedule loop, data, zeroing).
4. generate: KV-cache decoding against full recompute and against transformers' generate at 512
             tokens of context (bench/generate_bench.py); alone with `--only generate`.
5. cp:       context parallelism: CP2 ring attention against CP1 (SDPA and the same kernel) per step,
             and activation bytes per rank at CP1/2/4 (bench/cp_bench.py); only with `--only cp`.
6. attention: full, sliding-window and window+global-workspace attention cores at s = 1024, 2048,
             tokens/s beside the FLOPs each mask saves (bench/attention_bench.py); only with `--only attention`.

The machine is shared: every comparison interleaves its contenders, round by round, and reports
the median of the per-round ratios. Wall time gives tokens/s; process CPU time is reported next
to it because it is immune to other processes taking our core.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagpt.checkpoint.hf import iter_megagpt_to_hf, to_hf_config  # noqa: E402
from megagpt.config import ModelConfig  # noqa: E402
from megagpt.model_size import count_params  # noqa: E402
from megagpt.model.gpt import build_model  # noqa: E402
from scaling import median, print_scaling, run_scaling  # noqa: E402  (bench/scaling.py)

# vocab a multiple of 128 (make_vocab_divisible_by): megagpt computes no padded logits
PEER_SIZES = {
    "10M": dict(model=dict(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, ffn_hidden_size=768,
                           vocab_size=8192), batch=4, seq=128, rounds=12),
    "100M": dict(model=dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, ffn_hidden_size=2048,
                            vocab_size=16384), batch=2, seq=128, rounds=4),
}


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2: silence the fd, not just sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)



def quartiles(xs) -> list[float]:
    return [round(q, 3) for q in statistics.quantiles(xs, n=4)[::2]] if len(xs) > 1 else list(xs) * 2


# ----------------------------------------------------------------------------- 1. against a peer

class Contender:
    """One model + AdamW; step() returns wall and CPU seconds of forward, backward and optimizer."""

    def __init__(self, name, model, loss_fn):
        self.name, self.model, self.loss_fn = name, model.train(), loss_fn
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        self.losses = []

    def step(self, tokens, labels) -> dict:
        marks = [(time.perf_counter(), time.process_time())]
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, tokens, labels)
        marks.append((time.perf_counter(), time.process_time()))
        loss.backward()
        marks.append((time.perf_counter(), time.process_time()))
        self.opt.step()
        marks.append((time.perf_counter(), time.process_time()))
        self.losses.append(loss.item())
        out = {}
        for i, phase in enumerate(("fwd", "bwd", "opt")):
            out[phase] = marks[i + 1][0] - marks[i][0]
            out[phase + "_cpu"] = marks[i + 1][1] - marks[i][1]
        out["step"], out["step_cpu"] = marks[-1][0] - marks[0][0], marks[-1][1] - marks[0][1]
        return out


def megagpt_loss(model, tokens, labels):
    return model(tokens, labels).mean()                     # per-token losses [b, s], fp32


def hf_loss(model, tokens, labels):
    logits = model(input_ids=tokens).logits                 # [b, s, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def build_pair(cfg: ModelConfig, recompute: str):
    import transformers
    transformers.logging.set_verbosity_error()
    ours = build_model(cfg, seed=1234, recompute=recompute)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa"))
    missing = hf.load_state_dict(dict(iter_megagpt_to_hf(ours.state_dict().items(), cfg)), strict=False)
    assert not missing.unexpected_keys and not missing.missing_keys, missing
    if recompute == "full":
        hf.config.use_cache = False
        hf.gradient_checkpointing_enable()                  # one checkpoint per decoder layer
    return ours, hf


def run_peer(size: str, spec: dict, rounds: int) -> list[dict]:
    cfg = ModelConfig(**spec["model"], max_seq_len=spec["seq"], use_flash_attn=False)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"] + 1), generator=g)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    rows = []
    # group "none": no recompute on either side (+ megagpt selective); group "full": whole layers
    for group in ("none", "full"):
        ours, hf = build_pair(cfg, group)
        players = [Contender("megagpt", ours, megagpt_loss), Contender("transformers", hf, hf_loss)]
        if group == "none" and size == "10M":               # an extra row where it is cheap
            players.append(Contender("megagpt selective", build_model(cfg, seed=1234, recompute="selective"),
                                     megagpt_loss))
        times = {p.name: [] for p in players}
        for r in range(rounds + 1):                          # round 0 warms up (Adam allocates state)
            for p in (players if r % 2 else players[::-1]):  # alternate who goes first
                t = p.step(tokens, labels)
                if r:
                    times[p.name].append(t)
        loss_gap = abs(players[0].losses[0] - players[1].losses[0])
        work = {p.name: op_counts(p, tokens, labels) for p in players}
        ref = times["transformers"]
        for p in players:
            ts = times[p.name]
            rows.append({
                "size": size, "params": count_params(cfg), "recompute": group if p.name != "megagpt selective"
                else "selective", "impl": p.name, "batch": spec["batch"], "seq": spec["seq"],
                "tokens_per_s": spec["batch"] * spec["seq"] / median([t["step"] for t in ts]),
                **{k: median([t[k] for t in ts]) for k in ts[0]},
                # > 1: megagpt faster. Per-round ratios, then the median (pairs share the machine's state)
                "speedup_vs_hf": median([a["step"] / b["step"] for a, b in zip(ref, ts)]),
                "speedup_vs_hf_cpu": median([a["step_cpu"] / b["step_cpu"] for a, b in zip(ref, ts)]),
                "speedup_vs_hf_cpu_quartiles": quartiles([a["step_cpu"] / b["step_cpu"] for a, b in zip(ref, ts)]),
                "fwd_bwd_speedup_vs_hf_cpu": median([(a["fwd_cpu"] + a["bwd_cpu"]) / (b["fwd_cpu"] + b["bwd_cpu"])
                                                     for a, b in zip(ref, ts)]),
                # both sides run the same torch AdamW over the same number of elements: this ratio
                # departs from 1 only through noise, so it gauges the noise of the others
                "adamw_ratio_noise_gauge": median([a["opt_cpu"] / b["opt_cpu"] for a, b in zip(ref, ts)]),
                **work[p.name],
                "first_loss_gap": loss_gap})
        del players, ours, hf
        gc.collect()
    return rows


def profile_peer(size: str, recompute: str, rounds: int = 3) -> dict:
    """torch.profiler over forward + backward (AdamW is the same torch code on both sides): self CPU ms
    per op, summed over `rounds` alternating steps, then divided by rounds. For `--profile`."""
    from torch.profiler import ProfilerActivity, profile
    spec = PEER_SIZES[size]
    cfg = ModelConfig(**spec["model"], max_seq_len=spec["seq"], use_flash_attn=False)
    data = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"] + 1), generator=torch.Generator().manual_seed(0))
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    ours, hf = build_pair(cfg, recompute)
    sides = {"megagpt": (ours.train(), megagpt_loss), "transformers": (hf.train(), hf_loss)}
    per_op = {name: {} for name in sides}
    for r in range(rounds + 1):
        for name, (model, loss_fn) in sides.items():
            model.zero_grad(set_to_none=True)
            with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
                loss_fn(model, tokens, labels).backward()
            if r:
                for e in prof.key_averages():
                    per_op[name][e.key] = per_op[name].get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / rounds
    return per_op


def print_profile(per_op: dict, top: int = 15) -> None:
    ours, theirs = per_op["megagpt"], per_op["transformers"]
    print(f"{'op (self CPU, fwd+bwd)':55} {'megagpt ms':>11} {'HF ms':>9}")
    for op in sorted(set(ours) | set(theirs), key=lambda k: -max(ours.get(k, 0), theirs.get(k, 0)))[:top]:
        print(f"{op[:55]:55} {ours.get(op, 0):11.1f} {theirs.get(op, 0):9.1f}")
    print(f"{'total':55} {sum(ours.values()):11.1f} {sum(theirs.values()):9.1f}")


def op_counts(player: Contender, tokens, labels) -> dict:
    """The work of one forward + backward, independent of timing noise: GEMM FLOPs and aten calls."""
    from torch.profiler import ProfilerActivity, profile
    player.model.zero_grad(set_to_none=True)
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        player.loss_fn(player.model, tokens, labels).backward()
    player.model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    return {"gemm_gflop": sum(e.flops for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e9,
            "aten_ops": sum(e.count for e in events if e.key.startswith("aten::"))}


# ----------------------------------------------------------------------------- report

def load_average() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return []


def print_tables(res: dict) -> None:
    if res["peer"]:
        print_peer(res)
    if res["scaling"]:
        print_scaling(res)


def print_peer(res: dict) -> None:
    print("\n== megagpt vs transformers LlamaForCausalLM: fp32, 1 thread each, AdamW, step = fwd + bwd + AdamW")
    print(f"{'size':5} {'recompute':10} {'impl':18} {'tok/s':>8} {'fwd s':>7} {'bwd s':>7} {'opt s':>7} "
          f"{'vs HF (wall)':>12} {'vs HF (cpu) [quartiles]':>24} {'fwd+bwd (cpu)':>13} {'GEMM GFLOP':>10} {'aten ops':>8}")
    for r in res["peer"]:
        print(f"{r['size']:5} {r['recompute']:10} {r['impl']:18} {r['tokens_per_s']:8.0f} {r['fwd']:7.3f} "
              f"{r['bwd']:7.3f} {r['opt']:7.3f} {r['speedup_vs_hf']:11.2f}x {r['speedup_vs_hf_cpu']:11.2f}x {str(r['speedup_vs_hf_cpu_quartiles']):>12} "
              f"{r['fwd_bwd_speedup_vs_hf_cpu']:12.2f}x {r['gemm_gflop']:10.1f} {r['aten_ops']:8d}")
    gaps = [r["first_loss_gap"] for r in res["peer"]]
    gauge = [r["adamw_ratio_noise_gauge"] for r in res["peer"] if r["impl"] != "transformers"]
    print(f"('vs HF' > 1: megagpt faster; selective is compared with HF without recompute. Same weights on both\n"
          f" sides: first-step loss gap <= {max(gaps):.1e}. GEMM GFLOP, aten ops: one forward+backward, from the\n"
          f" profiler. Noise gauge: the identical AdamW step's time ratio ranged {min(gauge):.2f}..{max(gauge):.2f}x)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, 10M peer only (a smoke run)")
    ap.add_argument("--only", choices=("peer", "scaling", "generate", "cp", "attention"))
    ap.add_argument("--profile", metavar="SIZE", choices=list(PEER_SIZES),
                    help="only profile megagpt against HF at this size (forward + backward) and print the ops")
    ap.add_argument("--recompute", default="none", choices=("none", "full"), help="with --profile")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "results.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)   # deprecation notices from torch/transformers
    torch.set_num_threads(1)            # 1 thread each; forked ranks need a one-thread parent anyway
    if args.profile:
        print_profile(profile_peer(args.profile, args.recompute))
        return 0
    t0 = time.perf_counter()
    load = [load_average()]
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "threads_per_process": 1}, "peer": [], "scaling": {}}
    if args.only == "attention":                # alone: full / window / window+global (bench/attention_bench.py)
        from attention_bench import main as attention_main
        attention_main(["--rounds", "3"] if args.quick else [])
        return 0
    if args.only == "cp":                       # alone: context parallelism (bench/cp_bench.py)
        from cp_bench import print_cp, run_cp
        res = run_cp(args.quick)
        print_cp(res)
        if args.out == ap.get_default("out"):
            args.out = os.path.join(ROOT, "bench", "out", "cp.json")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res))
        return 0
    if args.only == "generate":                 # alone: KV cache vs recompute vs transformers (bench/generate_bench.py)
        from generate_bench import print_generate, run_generate
        res = run_generate(rounds=1 if args.quick else 3)
        print_generate(res)
        if args.out == ap.get_default("out"):
            args.out = os.path.join(ROOT, "bench", "out", "generate.json")
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return 0
    if args.only != "scaling":
        for size, spec in PEER_SIZES.items():
            if args.quick and size != "10M":
                continue
            res["peer"] += run_peer(size, spec, 2 if args.quick else spec["rounds"])
        import transformers
        res["machine"]["transformers"] = transformers.__version__
    if args.only != "peer":
        res["scaling"] = run_scaling(rounds=1 if args.quick else 3, steps=2)
    if args.only is None:
        from generate_bench import run_generate
        res["generate"] = run_generate(rounds=1 if args.quick else 3)
    load.append(load_average())
    res["machine"]["load_avg"] = [round(x, 1) for x in load[0][:1] + load[1][:1]]
    res["machine"]["bench_seconds"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print_tables(res)
    if "generate" in res:
        from generate_bench import print_generate
        print_generate(res["generate"])
    print(f"\nresults: {args.out}  ({res['machine']['bench_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
