"""Self-consistency on a small reasoning task: majority-vote accuracy against the number of sampled chains N.

The task: the sum of four two-digit numbers, "23+45+17+38:". A chain of thought adds them two at a time
in an order the writer picks, then states the answer: "23+17=40,40+45=85,85+38=123#123". The training
chains use a random order each time, so one question has 24 reasoning paths to the same answer and a
sampled chain picks one; a slip in one step of one path gives a wrong answer that other paths do not
share, which is what a vote over paths can outvote (Wang et al. 2022). A direct model is trained on
"23+45+17+38:#123" with the same size and steps on questions drawn alike, as a baseline.

Two tiny models of the flagship architecture (one per style) train for a fixed number of steps on the
CPU, on purpose not to convergence. On held-out questions (four numbers never seen together in
training), N chains per question are sampled from one prefill of the prompt
(`megagpt.self_consistency.self_consistency_batch`), the answer after '#' is pulled out with a regex and
the majority answer is scored. Every N draws its own chains (seeds differ). Prints a table with Wilson
95% intervals and its JSON, and plots accuracy against N (and the training losses):
    python examples/self_consistency_demo.py [--steps S] [--questions Q] [--out DIR]   # make self-consistency-demo

Measured (defaults, 1000 questions; lr from megagpt.optim.lr.lr_at, 50 warm-up steps then cosine to 10%;
268 CPU s in all, 3:24 wall at load 1-2.5): direct 0.090 [0.074, 0.109], greedy chain 0.234 [0.209, 0.261];
votes at T=0.7, N = 1/5/10/20: 0.202/0.348/0.425/0.559 (mean agreement 1.00/0.36/0.30/0.26), at T=1:
0.171/0.258/0.386/0.485. Rising at every step of N, with the intervals of neighbouring N apart. A single
chain is right about a fifth of the time, but its wrong answers scatter (11.1 distinct answers among 20
chains), so the right one is the plurality far more often. Most chains re-pair the question's tens and
units digits (59+63+15+43 -> 13+49+65+53), which keeps the sum; a chain is right about as often as it keeps
the digits (0.216 vs 0.199 at N=20), so its slips are in reading the numbers, not in adding them. The
trajectory is sensitive: the earlier hand-written schedule (nearly the same curve) gave greedy 0.322 and
T=0.7 0.358/0.489/0.638/0.777; the rise with N held in every run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.config import ModelConfig, TrainConfig  # noqa: E402
from megagpt.evaluate import wilson  # noqa: E402
from megagpt.generate import generate_ids  # noqa: E402
from megagpt.model.gpt import build_model  # noqa: E402
from megagpt.optim.lr import lr_at  # noqa: E402
from megagpt.parallel.spawn import spawn  # noqa: E402
from megagpt.plot import plot_curves  # noqa: E402
from megagpt.sampling import Sampling  # noqa: E402
from megagpt.self_consistency import regex_extractor, self_consistency_batch  # noqa: E402

CHARS = "0123456789+=,:#\n"
EOD = CHARS.index("\n")
ANSWER = r"#(\d+)"
OPERANDS = 4
# Chosen before any run, not tuned: Wang et al. sampled at T = 0.5-0.7; 0.7 keeps the choice of path (24
# orders, uniform in training) spread while sharpening each digit. T = 1 is shown beside it.
TEMPERATURES = (0.7, 1.0)
NS = (1, 5, 10, 20)


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def decode(ids) -> str:
    return "".join(CHARS[i] for i in ids if i != EOD)


def question(nums) -> str:
    return "+".join(map(str, nums)) + ":"


def chain(nums, rng: random.Random) -> str:
    """Adds the numbers two at a time in a random order: '23+17=40,40+45=85,85+38=123#123'."""
    seq = rng.sample(list(nums), len(nums))
    total, steps = seq[0], []
    for x in seq[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return ",".join(steps) + f"#{total}"


def split(questions: int, seed: int = 0):
    """Held-out questions (sorted number sets kept out of training) and a sampler of training questions."""
    rng = random.Random(seed)
    held, keys = [], set()
    while len(held) < questions:
        nums = tuple(rng.randint(10, 99) for _ in range(OPERANDS))
        if tuple(sorted(nums)) not in keys:
            keys.add(tuple(sorted(nums)))
            held.append(nums)

    def draw(r: random.Random):
        while True:
            nums = tuple(r.randint(10, 99) for _ in range(OPERANDS))
            if tuple(sorted(nums)) not in keys:
                return nums
    return held, draw


WIDTH = 48                                          # the longest chain row is 12 + 31 + EOD tokens
CFG = ModelConfig(vocab_size=len(CHARS), max_seq_len=WIDTH, hidden_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, ffn_hidden_size=256, make_vocab_divisible_by=1, use_flash_attn=False)


def train(style: str, draw, steps: int, seed: int = 0, batch: int = 64):
    """A tiny model trained on `style` ('cot' or 'direct') answers; loss on the answer only -> (model, losses)."""
    model = build_model(CFG, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = TrainConfig(lr=3e-3, min_lr=3e-4, warmup=50, train_iters=steps, decay_style="cosine")
    rng, losses = random.Random(seed + 1), []
    for step in range(steps):
        rows, starts = [], []
        for _ in range(batch):
            nums = draw(rng)
            reply = chain(nums, rng) if style == "cot" else f"#{sum(nums)}"
            q = question(nums)
            rows.append(encode(q + reply) + [EOD])
            starts.append(len(q))
        data = torch.tensor([r + [EOD] * (WIDTH + 1 - len(r)) for r in rows])      # [b, WIDTH + 1]
        mask = torch.zeros(batch, WIDTH)
        for i, (r, s) in enumerate(zip(rows, starts)):                             # the reply and its EOD
            mask[i, s - 1:len(r) - 1] = 1.0
        for g in opt.param_groups:                                                   # warmup, then cosine to 10%
            g["lr"] = lr_at(step, schedule)
        loss = (model(data[:, :-1], data[:, 1:]) * mask).sum() / mask.sum()       # [b, s] per-token losses
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  {style}: step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)
    return model.eval(), losses


def order(text: str) -> tuple[int, ...]:
    """The reasoning path of a chain: the numbers in the order it took them."""
    steps = re.findall(r"(\d+)\+(\d+)=", text)
    return tuple(map(int, steps[0] + tuple(b for _, b in steps[1:]))) if steps else ()


def same_digits(o: tuple[int, ...], q: tuple[int, ...]) -> bool:
    """The path takes the question's tens digits and its units digits, each once, paired in any way: the sum is
    unchanged, so such a path can still reach the right answer (a weak model often re-pairs the digits)."""
    return len(o) == len(q) and all(sorted(x // d % 10 for x in o) == sorted(x // d % 10 for x in q) for d in (1, 10))


def score(model, held, n: int, sampling: Sampling, block: int = 50) -> dict:
    """Majority-vote accuracy of N chains per question, its Wilson interval and mean agreement rate; the share of
    single chains that are right, that take the question's numbers each once (well-formed), and that take its
    digits each once (same_digits); per question the mean number of distinct paths among its same-digit chains
    and of distinct answers; the first question's chains."""
    extract = regex_extractor(ANSWER, decode)
    right, agree, chains_right, formed, digits, paths, answers = 0, 0.0, 0, 0, 0, 0, 0
    for i in range(0, len(held), block):
        part = held[i:i + block]
        sampling.seed += 1                                       # every block draws fresh chains
        votes = self_consistency_batch(model, [encode(question(q)) for q in part], n, 40, sampling, extract, eod_id=EOD)
        if i == 0:
            example = {"question": question(part[0]), "answer": sum(part[0]),
                       "chains": [decode(c) for c in votes[0].chains]}
        for v, q in zip(votes, part):
            right += v.answer == str(sum(q))
            agree += v.agreement
            chains_right += v.answers.count(str(sum(q)))
            taken = [order(decode(c)) for c in v.chains]
            formed += sum(sorted(o) == sorted(q) for o in taken)
            kept = [o for o in taken if same_digits(o, q)]
            digits += len(kept)
            paths += len(set(kept))
            answers += len(v.counts)
    m = len(held)
    return {"accuracy": right / m, "ci95": wilson(right, m), "agreement": agree / m,
            "chain_accuracy": chains_right / (m * n), "well_formed": formed / (m * n),
            "same_digits": digits / (m * n), "distinct_paths": paths / m, "distinct_answers": answers / m,
            "example": example}


def greedy(model, held) -> dict:
    extract = regex_extractor(ANSWER, decode)
    right = 0
    for i in range(0, len(held), 250):
        part = held[i:i + 250]
        outs = generate_ids(model, [encode(question(q)) for q in part], 40, eod_id=EOD)
        right += sum(extract(o) == str(sum(q)) for o, q in zip(outs, part))
    return {"accuracy": right / len(held), "ci95": wilson(right, len(held))}


def _train_rank(rank, world, questions: int, steps: int) -> dict:
    """Rank 0 trains the chain model, rank 1 the direct one, side by side on two cores."""
    model, losses = train(("cot", "direct")[rank], split(questions)[1], steps)
    return {"state": model.state_dict(), "losses": losses}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="self-consistency: accuracy against the number of sampled chains")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--out", default="self_consistency_run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    held = split(args.questions)[0]
    models, curves = {}, {}
    for style, r in zip(("cot", "direct"), spawn(2, _train_rank, args.questions, args.steps, timeout=3600)):
        models[style] = build_model(CFG)
        models[style].load_state_dict(r["state"])
        models[style].eval()
        curves[style] = (range(1, args.steps + 1), r["losses"])
    t_train = time.perf_counter() - t0
    res = {"steps": args.steps, "questions": len(held),
           "greedy_cot": greedy(models["cot"], held), "greedy_direct": greedy(models["direct"], held)}
    for t in TEMPERATURES:
        res[f"T={t}"] = {n: score(models["cot"], held, n, Sampling(do_sample=True, temperature=t, seed=1000 * n))
                         for n in NS}
    res["train_s"], res["seconds"] = round(t_train, 1), round(time.perf_counter() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    plot_curves(curves, os.path.join(args.out, "train_loss.png"), ylabel="answer loss (nats/token)")
    report(res, args.out)
    return res


def report(res: dict, out: str) -> None:
    fmt = lambda r: f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"  # noqa: E731
    print(f"sum of {OPERANDS} two-digit numbers, {res['questions']} held-out questions, models trained "
          f"{res['steps']} steps ({res['train_s']:.0f} s), {res['seconds']:.0f} s in all")
    print(f"  direct answer, greedy:         {fmt(res['greedy_direct'])}")
    print(f"  chain of thought, greedy:      {fmt(res['greedy_cot'])}")
    for t in TEMPERATURES:
        for n, r in res[f"T={t}"].items():
            print(f"  chains, T={t}, N={n:>2} vote:   {fmt(r)}  mean agreement {r['agreement']:.2f} | single chains "
                  f"right {r['chain_accuracy']:.3f}, well-formed {r['well_formed']:.3f}, "
                  f"same digits {r['same_digits']:.3f} | per question: {r['distinct_paths']:.1f} distinct paths, "
                  f"{r['distinct_answers']:.1f} distinct answers")
        rs = [res[f"T={t}"][n] for n in NS]
        rises = all(b["accuracy"] > a["accuracy"] for a, b in zip(rs, rs[1:]))
        apart = all(b["ci95"][0] > a["ci95"][1] for a, b in zip(rs, rs[1:]))
        print(f"  T={t}: accuracy {'rises' if rises else 'does NOT rise'} at every step of N = {NS}; the 95% "
              f"intervals of neighbouring N {'never overlap' if apart else 'overlap somewhere'}")
    ex = res[f"T={TEMPERATURES[0]}"][5]["example"]
    print(f"  the first question's 5 chains at T={TEMPERATURES[0]}: {ex['question']} (answer {ex['answer']}) "
          + " | ".join(ex["chains"]))
    curves = {f"majority vote, T={t}": (NS, [res[f"T={t}"][n]["accuracy"] for n in NS]) for t in TEMPERATURES}
    curves["greedy chain"] = (NS, [res["greedy_cot"]["accuracy"]] * len(NS))
    curves["greedy direct"] = (NS, [res["greedy_direct"]["accuracy"]] * len(NS))
    plot_curves(curves, os.path.join(out, "self_consistency.png"), xlabel="N sampled chains", ylabel="accuracy")
    dumped = json.dumps({**res, **{f"T={t}": {str(n): r for n, r in res[f"T={t}"].items()} for t in TEMPERATURES}})
    print(dumped)
    with open(os.path.join(out, "results.json"), "w") as f:
        f.write(dumped + "\n")
    print(f"wrote {out}/results.json, {out}/self_consistency.png and {out}/train_loss.png")


if __name__ == "__main__":
    main()
