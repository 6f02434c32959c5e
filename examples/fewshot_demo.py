"""Few-shot evaluation: accuracy against the number of shots k = 0, 1, 5 on tasks the model can only
solve in context.

A tiny model of the flagship architecture is trained on sequences of "item -> label" pairs in which the
numbers 0..49 share one label and 50..99 another, the two label words drawn afresh for every sequence
from a pool of nonsense words. So the label of a number is never a fact the model can store: it must be
read from the solved examples in the prompt. Three local task files (JSONL: query, choices, gold) each
fix one random pair of labels; `tools/evaluate.py` scores them by the log-likelihood of each label after
k shots drawn from the file. With no shot the model can only guess (0.5); one shot shows one label;
five show both, nearly always.

    python examples/fewshot_demo.py [--steps 1500] [--out fewshot_demo_run]      # make fewshot-demo
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from megagpt.config import ModelConfig  # noqa: E402
from megagpt.data.tokenizer import EOD_TOKEN, Tokenizer  # noqa: E402
from megagpt.model.gpt import build_model  # noqa: E402

LABELS = ["gorp", "blick", "fesh", "tamo", "vrill", "quen", "dax", "wug", "lorp", "zib", "mek", "snup",
          "trel", "bosk", "yim", "kalu"]


def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HF, models, pre_tokenizers
    words = [EOD_TOKEN, "<unk>", "->"] + [str(i) for i in range(100)] + LABELS
    hf = HF(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([EOD_TOKEN])
    return Tokenizer(hf)


def sequence(rng: random.Random, pairs: int = 10) -> tuple[list[str], list[bool]]:
    small, large = rng.sample(LABELS, 2)
    words, is_label = [], []
    for _ in range(pairs):
        n = rng.randrange(100)
        words += [str(n), "->", small if n < 50 else large]
        is_label += [False, False, True]
    return words, is_label


def train(tok, steps: int, out: str, seed: int = 0):
    cfg = ModelConfig(vocab_size=tok.vocab_size, max_seq_len=64, hidden_size=64, num_layers=2, num_heads=4,
                      ffn_hidden_size=256, make_vocab_divisible_by=1, tie_embeddings=True, use_flash_attn=False)
    model = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))
    rng, t0 = random.Random(seed), time.perf_counter()
    with open(os.path.join(out, "metrics.jsonl"), "w") as metrics:
        for step in range(steps):
            seqs = [sequence(rng) for _ in range(32)]
            data = torch.tensor([tok.encode(" ".join(w)) for w, _ in seqs])       # [b, s+1], as prompts are
            mask = torch.tensor([m[1:] for _, m in seqs], dtype=torch.float32)     # [b, s]: the labels
            loss = (model(data[:, :-1], data[:, 1:]) * mask).sum() / mask.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            metrics.write(json.dumps({"step": step + 1, "loss": loss.item()}) + "\n")
            if (step + 1) % 250 == 0:
                print(f"  step {step + 1:>5}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval()


def write_tasks(out: str, seed: int, n_tasks: int = 3, rows: int = 200) -> list[str]:
    rng, paths = random.Random(seed + 1), []
    for t in range(n_tasks):
        small, large = rng.sample(LABELS, 2)
        path = os.path.join(out, f"labels_{small}_{large}.jsonl")
        with open(path, "w") as f:
            for _ in range(rows):
                n = rng.randrange(100)
                f.write(json.dumps({"query": f"{n} ->", "choices": [small, large], "gold": int(n >= 50)}) + "\n")
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--out", default="fewshot_demo_run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))    # a 64-wide model gains nothing from 2
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    tok = tokenizer()
    t0 = time.perf_counter()
    model = train(tok, args.steps, args.out, args.seed)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s")
    from megagpt.loading import save_for_inference
    import evaluate as eval_tool
    tok.save(os.path.join(args.out, "tokenizer.json"))
    ckpt = os.path.join(args.out, "ckpt")
    save_for_inference(ckpt, model, os.path.join(args.out, "tokenizer.json"))
    argv = ["--load", ckpt, "--k", "0,1,5", "--json", os.path.join(args.out, "results.json")]
    for path in write_tasks(args.out, args.seed):
        argv += ["--task", path]
    print(f"$ python tools/evaluate.py {' '.join(argv)}")
    return eval_tool.main(argv)


if __name__ == "__main__":
    sys.exit(main())
