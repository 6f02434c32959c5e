"""Where megagpt and picotron differ inside a step: one decoder layer, the head (final norm + LM head +
cross-entropy) and the attention core, forward + backward, in one process on one thread, alternated.

    python bench/layer_vs_picotron.py [--picotron /work/picotron] [--reps 30] [--rounds 3]

The issue-18 shape (bench/one_process.MODEL) at one microbatch (2 x 256 tokens). picotron's modules are
built as its train.py builds them on the CPU (FLASH_ATTEN=0: SDPA with repeat_interleave'd KV heads, its
LlamaRMSNorm, nn.Linear per projection, F.cross_entropy); megagpt's are layer 0 and the head of
`build_model`. Both run with glibc's malloc tuned as megagpt's trainer does (megagpt/malloc_tuning.py),
so neither pays page faults the other does not. The figure is the median CPU time (time.process_time) of
`reps` calls, per round; the ratio is taken per round. Also timed: the attention core alone, causal
against non-causal, which shows whether the CPU flash kernel skips the masked half at this length.
A note, not part of the suite (picotron is not on PyPI; see bench/README.md for the clone and patch).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--picotron", default=os.environ.get("PICOTRON_DIR", "/work/picotron"))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.picotron, "picotron", "model.py")):
        print(f"layer_vs_picotron: expected a patched picotron clone at --picotron {args.picotron} "
              "(bench/README.md)", file=sys.stderr)
        return 2
    os.environ.update(DEVICE="cpu", DTYPE="float32", FLASH_ATTEN="0", LOCAL_RANK="0")
    sys.path[:0] = [ROOT, os.path.join(ROOT, "bench"), args.picotron]
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from megagpt.malloc_tuning import tune_malloc
    tune_malloc("cpu")
    import picotron.process_group_manager as pgm
    pgm.process_group_manager = types.SimpleNamespace(tp_world_size=1, cp_world_size=1, cp_rank=0)
    from picotron.model import DecoderLayer, FinalProjection, LlamaRMSNorm
    from transformers import LlamaConfig

    from megagpt.config import ModelConfig
    from megagpt.model.gpt import build_model
    from one_process import MODEL, TRAIN

    b, s, h, v = TRAIN["micro_batch_size"], TRAIN["seq_len"], MODEL["hidden_size"], MODEL["vocab_size"]
    nq, nkv, d = MODEL["num_heads"], MODEL["num_kv_heads"], h // MODEL["num_heads"]
    pico_cfg = LlamaConfig(hidden_size=h, intermediate_size=MODEL["ffn_hidden_size"], num_attention_heads=nq,
                           num_key_value_heads=nkv, num_hidden_layers=1, vocab_size=v, max_position_embeddings=s,
                           rms_norm_eps=1e-5, rope_theta=10000.0)
    pico_layer, pico_norm, pico_proj = DecoderLayer(pico_cfg, 0), LlamaRMSNorm(h), FinalProjection(h, v)
    mg = build_model(ModelConfig(**MODEL))
    mg_layer = mg.layers["0"]
    cos, sin = mg._rope(s, "cpu", torch.float32)
    x_bsh = torch.randn(b, s, h)                                 # picotron's layout [b, s, h]
    x_sbh = x_bsh.transpose(0, 1).contiguous()                   # megagpt's [s, b, h]
    labels = torch.randint(0, v, (b, s))
    q, k, val = torch.randn(b, nq, s, d), torch.randn(b, nkv, s, d), torch.randn(b, nkv, s, d)
    g = torch.randn(b, nq, s, d)

    def pico_layer_step():
        x = x_bsh.clone().requires_grad_()
        pico_layer(x).sum().backward()

    def mg_layer_step():
        x = x_sbh.clone().requires_grad_()
        mg_layer(x, cos, sin).sum().backward()

    def pico_head_step():
        x = x_bsh.clone().requires_grad_()
        F.cross_entropy(pico_proj(pico_norm(x)).view(-1, v), labels.view(-1)).backward()

    def mg_head_step():
        x = x_sbh.clone().requires_grad_()
        mg.head(x, labels).mean().backward()

    def attention(causal: bool):
        def step():
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, val))
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal, enable_gqa=True).backward(g)
        return step

    rows = {"decoder layer": (pico_layer_step, mg_layer_step), "head (norm + LM head + CE)": (pico_head_step, mg_head_step),
            "attention core: causal / full": (attention(False), attention(True))}
    results = {name: [] for name in rows}
    for r in range(args.rounds):
        for name, (pico_fn, mg_fn) in rows.items():
            first, second = (pico_fn, mg_fn) if r % 2 == 0 else (mg_fn, pico_fn)   # alternate who goes first
            times = {first: median_ms(first, args.reps), second: median_ms(second, args.reps)}
            results[name].append((times[pico_fn], times[mg_fn]))
    print(f"one microbatch ({b} x {s} tokens), fwd + bwd, 1 thread, CPU ms: median of {args.reps} calls, "
          f"[min, max] over {args.rounds} rounds; load {os.getloadavg()[0]:.1f}")
    print(f"{'part':32} {'picotron':>20} {'megagpt':>20} {'picotron / megagpt':>22}")
    for name, pairs in results.items():
        a, c = [p[0] for p in pairs], [p[1] for p in pairs]
        ratio = [x / y for x, y in pairs]
        print(f"{name:32} {statistics.median(a):>9.2f} [{min(a):.1f}, {max(a):.1f}] "
              f"{statistics.median(c):>9.2f} [{min(c):.1f}, {max(c):.1f}] "
              f"{statistics.median(ratio):>12.3f} [{min(ratio):.3f}, {max(ratio):.3f}]"
              + ("   (columns: full, causal)" if name.startswith("attention") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
