#!/usr/bin/env python
"""Show that checkpoint conversion streams: peak memory stays far below the model's size.

    python tools/convert_memory_check.py [--hidden 1024 --layers 24 --ffn 768 --vocab 4096] [--keep DIR]

Writes a random Llama-format model (tensor by tensor, so this script never holds it either), then
runs the conversions in a fresh subprocess and reports each one's peak resident memory above
the process's resident memory when it started: HF -> megagpt TP2 PP2 (with a fresh optimizer state), megagpt ->
megagpt TP1 PP4 with the optimizer, megagpt -> HF. The high-water mark (VmHWM) is reset just
before each conversion (/proc/self/clear_refs), so imports and earlier jobs do not count; where that
is not allowed the figure is the process's ru_maxrss minus the baseline, an upper bound.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

# Runs in the subprocess: everything imported first. Before each conversion, freed heap memory goes back
# to the OS (else a later job would reuse what an earlier one freed without it showing as resident),
# then the high-water mark is reset to the current RSS: each figure is that conversion's own peak.
_CHILD = r"""
import ctypes, gc, json, resource, sys
import torch
torch.set_num_threads(1)
from megagpt.checkpoint.convert import convert

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

out = []
try:
    trim = ctypes.CDLL("libc.so.6").malloc_trim
except OSError:
    trim = lambda pad: None
for src, dst, to, kwargs in json.loads(sys.argv[1]):
    gc.collect()
    trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                             # reset the peak RSS to the current RSS
        exact = True
    except OSError:
        exact = False
    base = status("VmRSS")
    convert(src, dst, to, **kwargs)
    peak = status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.append({"baseline": base, "peak_over_baseline": peak - base, "exact": exact})
print(json.dumps(out))
"""


def make_hf_dir(path: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                seed: int = 0) -> int:
    """A random fp32 Llama directory (config.json + model.safetensors); returns the weights' bytes."""
    from megagpt.checkpoint.convert import SafetensorsWriter
    from megagpt.checkpoint.hf import hf_shapes, to_hf_config
    from megagpt.config import ModelConfig
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=256, hidden_size=hidden, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv_heads, ffn_hidden_size=ffn)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**to_hf_config(cfg), "torch_dtype": "float32"}, f)
    shapes = hf_shapes(cfg)
    writer = SafetensorsWriter(os.path.join(path, "model.safetensors"),
                               [(n, torch.float32, s) for n, s in shapes.items()], {"format": "pt"})
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        writer.write(name, torch.randn(shape, generator=g) * 0.02)
    writer.close()
    return sum(4 * torch.Size(s).numel() for s in shapes.values())


def measure(jobs: list[tuple[str, str, str, dict]]) -> list[dict]:
    """Run convert(src, dst, to, **kwargs) for each job, in order, in one fresh process; the peak memory
    of each above the RSS it started from. The first job's baseline is the process after its imports."""
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(jobs)], capture_output=True, text=True,
                         check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(f"conversion failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="convert-mem-") as tmp:
        work = args.keep or tmp
        size = make_hf_dir(os.path.join(work, "hf"), args.hidden, args.layers, args.heads, args.kv_heads, args.ffn,
                           args.vocab)
        print(f"model: hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}: "
              f"{size / 2**20:.0f} MiB of fp32 weights")
        runs = [("HF -> megagpt tp2 pp2 (+ fresh optimizer)", "hf", "mg", "megagpt",
                 dict(tp=2, pp=2, with_optimizer=True)),
                ("megagpt -> megagpt tp1 pp4 (+ optimizer)", "mg", "mg2", "megagpt",
                 dict(tp=1, pp=4, with_optimizer=True)),
                ("megagpt -> HF", "mg2", "hf2", "hf", {})]
        results = measure([(os.path.join(work, src), os.path.join(work, dst), to, kw) for _, src, dst, to, kw in runs])
        for (label, *_), r in zip(runs, results):
            peak = r["peak_over_baseline"]
            print(f"{label:<45} peak {peak / 2**20:7.1f} MiB over a baseline of {r['baseline'] / 2**20:.0f} MiB "
                  f"= {100 * peak / size:.1f}% of the model{'' if r['exact'] else ' (upper bound)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
