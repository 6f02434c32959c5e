"""make serve-demo: start tools/serve.py on a checkpoint, call it with the official openai client, print the
replies and the measured tokens/s (a table, then one JSON line).

    python examples/serve_demo.py                      # demo_run/train if `make demo` made it, else a tiny model
    python examples/serve_demo.py --load runs/tiny --tp 2 --new-tokens 64

Without a trained checkpoint it serves a tiny random-weight model made here: the replies are noise, the
point is the API and the speed. tokens/s counts generated tokens (the server's usage) over wall time:
greedy requests one at a time, then `--clients` at once (greedy requests waiting together run as one
batch, so the aggregate rate rises with the clients).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRAINED = os.path.join(ROOT, "demo_run", "train")


def tiny_checkpoint(root: str) -> str:
    """A random-weight model of the flagship's architecture with a small BPE, saved in one process."""
    import torch
    from megagpt.checkpoint.sharded import save_checkpoint
    from megagpt.config import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig
    from megagpt.data.tokenizer import Tokenizer
    from megagpt.parallel.state import ParallelState
    from megagpt.pipeline.split import build_stage
    torch.set_num_threads(1)
    tok_path = os.path.join(root, "tokenizer.json")
    lines = ["ROMEO. But soft, what light through yonder window breaks?", "JULIET. O Romeo, Romeo, wherefore art thou?"]
    Tokenizer.train(lines * 50, vocab_size=400).save(tok_path)
    model = ModelConfig(vocab_size=512, max_seq_len=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                        ffn_hidden_size=352, make_vocab_divisible_by=1, use_flash_attn=False)
    cfg = Config(model=model, parallel=ParallelConfig(), data=DataConfig(tokenizer=tok_path),
                 train=TrainConfig(seq_len=512, micro_batch_size=1, global_batch_size=1))
    ps = ParallelState.single()
    run = os.path.join(root, "tiny")
    save_checkpoint(run, 1, build_stage(cfg, ps, seed=1234), ps, cfg, {})
    return run


def start(load: str, tp: int, pp: int):
    """The server's tp*pp ranks as processes (what torchrun would start, without its agent, so that a
    SIGTERM to rank 0 is a clean stop); returns them and rank 0's base URL."""
    from megagpt.parallel.spawn import free_port
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    world, port = tp * pp, free_port()
    procs = []
    for rank in range(world):
        if world > 1:
            env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--load", load, "--port", "0", "--model-name",
             "demo", "--tp", str(tp), "--pp", str(pp)], env=env, stdout=subprocess.PIPE if rank == 0 else None,
            text=True))
    line = []
    t = threading.Thread(target=lambda: line.append(procs[0].stdout.readline()), daemon=True)
    t.start()
    t.join(300)
    if not line or " on " not in line[0]:
        for p in procs:
            p.kill()
        raise SystemExit(f"serve-demo: the server did not start (exit code {procs[0].poll()})")
    print(line[0].strip())
    return procs, line[0].split(" on ")[1].split()[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", help="checkpoint directory (default: demo_run/train, else a tiny random model)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args(argv)
    import openai
    tmp = tempfile.TemporaryDirectory(prefix="megagpt-serve-demo-")
    load = args.load or (TRAINED if os.path.isdir(TRAINED) else None)
    if load is None:
        print("serve-demo: no demo_run/train (run `make demo` for a trained model); serving a tiny random model")
        load = tiny_checkpoint(tmp.name)
    procs, url = start(load, args.tp, args.pp)
    client = openai.OpenAI(base_url=url, api_key="demo", timeout=300, max_retries=0)
    try:
        print(f"models: {[m.id for m in client.models.list().data]}")
        r = client.completions.create(model="demo", prompt="ROMEO.\n", max_tokens=40, temperature=0.8, seed=0)
        print(f"\n[completion] ROMEO.\n{r.choices[0].text!r}  ({r.usage.completion_tokens} tokens, "
              f"{r.choices[0].finish_reason})")
        r = client.chat.completions.create(model="demo", max_tokens=40, temperature=0.8, seed=0,
                                           messages=[{"role": "user", "content": "Who is Juliet?"}])
        print(f"\n[chat] Who is Juliet?\n{r.choices[0].message.content!r}")
        print("\n[stream] ROMEO.\n", end="")
        t0, first = time.perf_counter(), None
        for ev in client.completions.create(model="demo", prompt="ROMEO.\n", max_tokens=40, temperature=0, stream=True):
            first = first or time.perf_counter() - t0
            print(ev.choices[0].text, end="", flush=True)
        print(f"\n(first token after {first * 1000:.0f} ms)")

        def one(i):
            return client.completions.create(model="demo", prompt=f"JULIET {i}.", max_tokens=args.new_tokens,
                                             temperature=0, extra_body={"ignore_eos": True}).usage.completion_tokens
        t0 = time.perf_counter()
        seq = sum(one(i) for i in range(args.requests))
        seq_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            conc = sum(pool.map(one, range(args.clients), timeout=600))
        conc_s = time.perf_counter() - t0
        rows = [("sequential", args.requests, seq, seq_s), (f"{args.clients} concurrent", args.clients, conc, conc_s)]
        print(f"\n{'run':<14} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
        for name, n, tokens, secs in rows:
            print(f"{name:<14} {n:>8} {tokens:>7} {secs:>8.2f} {tokens / secs:>9.1f}")
        print(json.dumps({"load": load, "tp": args.tp, "pp": args.pp, "new_tokens": args.new_tokens,
                          "sequential_tokens_per_s": round(seq / seq_s, 1),
                          "concurrent_tokens_per_s": round(conc / conc_s, 1), "clients": args.clients}))
    finally:
        procs[0].send_signal(signal.SIGTERM)            # rank 0 stops uvicorn, then tells the followers to stop
        codes = [p.wait(timeout=60) for p in procs]
        tmp.cleanup()
    print(f"server stopped, exit codes {codes}")
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
