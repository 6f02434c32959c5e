#!/usr/bin/env python
"""bf16 training step of a ~1B-parameter megagpt model on one CUDA GPU, against transformers' Llama.

    python tools/gpu_bench.py                  # the 1B config at seq 4096 (one GPU, no network)
    python tools/gpu_bench.py --smoke          # a tiny config, runs on the CPU too (checked by the tests)
    python tools/gpu_bench.py --recompute full --steps 8 --json out.json

Contenders, built in turn on the same GPU in one run (each one freed before the next):
  megagpt              GPTModel in bf16 with megagpt's optimizer: fp32 grad buffer, fp32 master
                       weights and Adam moments (what `train.dtype=bf16` trains with);
  megagpt + torch AdamW  the same model with torch.optim.AdamW (fused) straight on the bf16 weights;
  transformers         LlamaForCausalLM from `to_hf_config` (SDPA attention), bf16 weights,
                       torch.optim.AdamW (fused): the like-for-like peer of the row above.
Reported per contender: step time (median over the timed steps), tokens/s, model TFLOP/s
(`model_size.flops_per_token`: 3x forward, causal attention, no recompute), MFU against the GPU's
dense bf16 peak (from nvidia-smi's name: H100/H200 989, A100 312, else --peak-tflops or n/a),
and peak allocated memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagpt.checkpoint.hf import to_hf_config  # noqa: E402
from megagpt.config import ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megagpt.model_size import count_params, flops_per_token, peak_for  # noqa: E402
from megagpt.model.attention import _flash_attn_func  # noqa: E402
from megagpt.model.gpt import build_model  # noqa: E402
from megagpt.optim.optimizer import build_optimizer  # noqa: E402
from megagpt.parallel.state import ParallelState  # noqa: E402

# ~1.03B parameters: GQA (16 query heads of 128, 4 KV heads), SwiGLU, untied, vocab a multiple of 128
FULL = dict(model=dict(hidden_size=2048, num_layers=20, num_heads=16, num_kv_heads=4, ffn_hidden_size=5632,
                       vocab_size=32000), seq=4096, batch=1)
SMOKE = dict(model=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128,
                        vocab_size=256), seq=64, batch=2)
def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- contenders

def megagpt_own(cfg: ModelConfig, device, recompute: str, lr: float = 1e-4):
    """megagpt's mixed precision: bf16 weights, fp32 grads and master weights (ZeRO-1 on one rank)."""
    ps = ParallelState.single(device)
    model = build_model(cfg, ps, recompute=recompute, device=device, dtype=torch.bfloat16)
    tcfg = TrainConfig(seq_len=cfg.max_seq_len, dtype="bf16", lr=lr)
    opt = build_optimizer([model], ps, tcfg, ParallelConfig(), cfg)

    def step(tokens, labels):
        opt.zero_grad()
        opt.set_sync(True)                                    # one microbatch: reduce (a no-op on 1 rank)
        loss = model(tokens, labels).sum() / labels.numel()
        opt.scale_loss(loss).backward()
        opt.step(lr)
        return loss
    return model, step


def megagpt_torch_adamw(cfg: ModelConfig, device, recompute: str, lr: float = 1e-4):
    model = build_model(cfg, recompute=recompute, device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda" or None)

    def step(tokens, labels):
        opt.zero_grad(set_to_none=True)
        loss = model(tokens, labels).mean()
        loss.backward()
        opt.step()
        return loss
    return model, step


def transformers_llama(cfg: ModelConfig, device, recompute: str, lr: float = 1e-4):
    import transformers
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa", use_cache=False)
    with torch.device(device):                                # allocate and initialise on the device
        model = transformers.LlamaForCausalLM(hf_cfg)
    model.to(torch.bfloat16).train()
    if recompute == "full":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda" or None)

    def step(tokens, labels):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens).logits              # [b, s, V] bf16
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())   # as HF's own loss: fp32
        loss.backward()
        opt.step()
        return loss
    return model, step


CONTENDERS = {"megagpt": megagpt_own, "megagpt + torch AdamW": megagpt_torch_adamw,
              "transformers": transformers_llama}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name, build, cfg, spec, device, args, peak) -> dict:
    row = {"impl": name, "params": count_params(cfg), "seq": spec["seq"], "batch": spec["batch"]}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    try:
        model, step = build(cfg, device, args.recompute)
        row["build_s"] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()              # training memory, not the build's transients
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["seq"] + 1), generator=g).to(device)
        tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        times, losses = [], []
        for i in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            loss = step(tokens, labels)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        return row
    finally:
        model = step = loss = None                            # free before the next contender
        gc.collect()
    step_s = statistics.median(times)
    tokens_per_s = spec["batch"] * spec["seq"] / step_s
    tflops = flops_per_token(cfg, spec["seq"]) * tokens_per_s / 1e12
    row.update(step_s=step_s, tokens_per_s=tokens_per_s, tflops=tflops, mfu=tflops / peak if peak else None,
               peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
               first_loss=losses[0], last_loss=losses[-1], finite=all(map(lambda x: x == x and abs(x) < 1e9, losses)))
    return row


def print_table(res: dict) -> None:
    peak = res["peak_tflops"] or ("n/a" if res["device"] == "cpu" else "n/a (unknown GPU: pass --peak-tflops)")
    print(f"\n{res['gpu']}  peak {peak} TFLOP/s bf16  |  "
          f"{res['params'] / 1e6:.1f}M params, seq {res['seq']}, batch {res['batch']}, recompute {res['recompute']}, "
          f"megagpt attention: {res['megagpt_attention']}")
    print(f"{'impl':24} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9} {'loss 1st->last':>16}")
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['impl']:24} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:6.1f}%" if r["mfu"] is not None else "    n/a"
        mem = f"{r['peak_mem_gb']:9.1f}" if r["peak_mem_gb"] is not None else "      n/a"
        print(f"{r['impl']:24} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {mfu} {mem} "
              f"{r['first_loss']:7.3f}->{r['last_loss']:.3f}")
    base = {r["impl"]: r for r in res["rows"] if "error" not in r}
    if "transformers" in base:
        for name in ("megagpt", "megagpt + torch AdamW"):
            if name in base:
                print(f"{name} / transformers tokens/s: {base[name]['tokens_per_s'] / base['transformers']['tokens_per_s']:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config (seconds, CPU or GPU)")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; smoke 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--recompute", default="none", choices=("none", "full"))
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the peak used for MFU")
    ap.add_argument("--only", nargs="*", choices=list(CONTENDERS), help="run only these contenders")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "out", "gpu_results.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.smoke:
        print("gpu_bench: no CUDA device; the 1B config is for a GPU (use --smoke on the CPU)", file=sys.stderr)
        return 2
    args.steps = args.steps or (2 if args.smoke else 5)
    spec = SMOKE if args.smoke else FULL
    cfg = ModelConfig(**spec["model"], max_seq_len=spec["seq"])   # use_flash_attn: flash-attn if importable
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    name = gpu_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_for(name) if device.type == "cuda" else None)
    flash = device.type == "cuda" and cfg.use_flash_attn and _flash_attn_func() is not None
    res = {"gpu": name, "peak_tflops": peak, "device": str(device), "smoke": args.smoke, "params": count_params(cfg),
           "seq": spec["seq"], "batch": spec["batch"], "recompute": args.recompute, "torch": torch.__version__,
           "megagpt_attention": "flash-attn" if flash else "torch SDPA", "model": spec["model"], "rows": []}
    for cname in args.only or CONTENDERS:
        res["rows"].append(measure(cname, CONTENDERS[cname], cfg, spec, device, args, peak))
    print_table(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"results: {args.json}")
    return 0 if all("error" not in r and r["finite"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
