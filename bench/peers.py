"""Peers at the issue-18 shape, one process: megagpt's Trainer step against transformers' Llama and
torchtitan's Llama3 model, each stepping the same 8 sequences (4 microbatches of 2, seq 256).

    python bench/peers.py [--threads 1] [--rounds 3] [--steps 4]

The peers run a plain loop: forward, F.cross_entropy, backward per microbatch (loss / 4), then
clip_grad_norm_(1.0) and torch.optim.AdamW (foreach), as megagpt's step does (it clips at 1.0 too).
transformers comes from the test extra; torchtitan is not a dependency (its requirements pull datasets,
wandb, spmd_types, ...): it is timed when `import torchtitan` works (PYTHONPATH to an unpacked wheel and
its few import-time modules is enough), else its row says why. Its language-model attention backends are
flex / varlen only, so its blocks are built with its ScaledDotProductAttention module (causal SDPA, as
megagpt's). Figures: tokens/s from the median step (wall) and CPU seconds per step, rounds alternating
the order; min/max over rounds. Results merge into bench/out/results.json under "peers_issue18".
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from one_process import MODEL, TRAIN, raw_config  # noqa: E402
from megagpt.config import ModelConfig, config_from_dict  # noqa: E402
from megagpt.parallel.spawn import spawn  # noqa: E402

MB = TRAIN["global_batch_size"] // TRAIN["micro_batch_size"]


def build_hf():
    import transformers
    from megagpt.checkpoint.hf import to_hf_config
    transformers.logging.set_verbosity_error()
    cfg = ModelConfig(**MODEL)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa"))


def build_titan():
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import Llama3Model, _build_llama3_layers
    import torchtitan.models.llama3 as t3
    h, v = MODEL["hidden_size"], MODEL["vocab_size"]
    rope = ComplexRoPE.Config(dim=h // MODEL["num_heads"], max_seq_len=TRAIN["seq_len"], theta=10000.0,
                              scaling="none")
    orig = t3.get_attention_config
    t3.get_attention_config = lambda backend: ScaledDotProductAttention.Config()   # causal SDPA
    try:
        layers = _build_llama3_layers(n_layers=MODEL["num_layers"], dim=h, n_heads=MODEL["num_heads"],
                                      n_kv_heads=MODEL["num_kv_heads"], hidden_dim=MODEL["ffn_hidden_size"],
                                      rope=rope, attn_backend="sdpa")
    finally:
        t3.get_attention_config = orig
    cfg = Llama3Model.Config(dim=h, vocab_size=v, tok_embeddings=Embedding.Config(num_embeddings=v, embedding_dim=h),
                             norm=RMSNorm.Config(normalized_shape=h), lm_head=Linear.Config(in_features=h, out_features=v),
                             layers=layers)
    model = cfg.build()
    model.init_states()
    return model


def _peer_worker(rank, world, name, steps, threads):
    torch.set_num_threads(threads)
    try:
        model = {"transformers": build_hf, "torchtitan": build_titan}[name]().train()
    except Exception as e:  # noqa: BLE001 -- reported as the row's reason
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(0)
    b, s, V = TRAIN["micro_batch_size"], TRAIN["seq_len"], MODEL["vocab_size"]
    data = [torch.randint(0, V, (b, s + 1), generator=g) for _ in range(MB)]

    def logits_of(tokens):
        out = model(input_ids=tokens) if name == "transformers" else model(tokens)
        return out.logits if hasattr(out, "logits") else out

    def step():
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for d in data:
            loss = F.cross_entropy(logits_of(d[:, :-1]).flatten(0, 1).float(), d[:, 1:].flatten()) / MB
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(total)
    for _ in range(2):
        step()
    out = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        out.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "loss": loss})
    return {"steps": out, "params": sum(p.numel() for p in model.parameters())}


def _megagpt_worker(rank, world, steps, threads):
    from megagpt.train import Trainer
    torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(config_from_dict(raw_config({}, steps), 1), run_dir=os.devnull)
    for _ in range(2):
        trainer.train_step()
    out = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        rec = trainer.train_step()
        out.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "loss": rec["loss"]})
    return {"steps": out, "params": sum(p.numel() for c in trainer.chunks for p in c.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "results.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = ["megagpt", "transformers", "torchtitan"]
    runs = {n: [] for n in names}
    errors = {}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            if n in errors:
                continue
            res = spawn(1, _megagpt_worker, args.steps, args.threads, timeout=1800)[0] if n == "megagpt" else \
                spawn(1, _peer_worker, n, args.steps, args.threads, timeout=1800)[0]
            if "error" in res:
                errors[n] = res["error"]
                continue
            runs[n].append(res)
            print(f"  round {r} {n:13} median step {statistics.median(s['wall'] for s in res['steps']):.2f} s wall, "
                  f"{statistics.median(s['cpu'] for s in res['steps']):.2f} s CPU", flush=True)
    tokens = TRAIN["global_batch_size"] * TRAIN["seq_len"]
    table = {}
    base = [statistics.median(s["cpu"] for s in res["steps"]) for res in runs["megagpt"]]
    for n in names:
        if n in errors:
            table[n] = {"error": errors[n]}
            continue
        walls = [statistics.median(s["wall"] for s in res["steps"]) for res in runs[n]]
        cpus = [statistics.median(s["cpu"] for s in res["steps"]) for res in runs[n]]
        table[n] = {"tokens_per_s": tokens / statistics.median(walls), "tok_s_min": tokens / max(walls),
                    "tok_s_max": tokens / min(walls), "cpu_s_per_step": statistics.median(cpus),
                    "cpu_s_min": min(cpus), "cpu_s_max": max(cpus), "params": runs[n][0]["params"],
                    "megagpt_cpu_advantage": statistics.median([c / b for c, b in zip(cpus, base)]),
                    "first_loss": runs[n][0]["steps"][0]["loss"]}
    print(f"\n== peers, one process, {args.threads} thread(s), the issue-18 shape (8 x 256 tokens a step)")
    print(f"{'impl':13} {'tok/s':>7} {'[min, max]':>14} {'CPU s/step':>10} {'[min, max]':>14} {'peer CPU / megagpt CPU':>23}")
    for n, o in table.items():
        if "error" in o:
            print(f"{n:13} not run: {o['error']}")
            continue
        print(f"{n:13} {o['tokens_per_s']:7.0f} [{o['tok_s_min']:5.0f}, {o['tok_s_max']:5.0f}] {o['cpu_s_per_step']:10.2f} "
              f"[{o['cpu_s_min']:.2f}, {o['cpu_s_max']:.2f}] {o['megagpt_cpu_advantage']:22.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    old = json.load(open(args.out)) if os.path.exists(args.out) else {}
    old[f"peers_issue18_{args.threads}thread"] = {"rows": table, "threads": args.threads, "rounds": args.rounds,
                                                 "steps": args.steps, "load_avg": os.getloadavg()[0],
                                                 "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump(old, f, indent=1)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
