"""make moe-demo: does a mixture of experts help on a corpus of several domains, and mixture of depths?

The corpus (examples/moe_domains.py): four synthetic task domains (arithmetic, sorted/reversed lists,
a table of invented facts, bracketed code) and Shakespeare, about equal in size, BPE 4096. Each model
is a tiny decoder trained in its own process by the project's Trainer, same batches and schedule:
  dense       SwiGLU MLP of width 2f, 4 layers
  moe         8 SwiGLU experts of width f, top-2 renormalised (Mixtral), load-balancing loss 0.01:
              the same active parameters per token as dense (plus an 8 x h router), 4x its MLP in total
  moe-noaux   the same without the balancing loss (does the routing collapse?)
  mod         8 layers, mixture of depths at 12.5% capacity on every other one, trained for the steps
              that give it dense's training FLOPs (model_size.flops_per_token, MoD included)
Reported: validation loss (the corpus' held-out split, and per domain on held-out documents), parameters,
median step time (wall, and CPU time of the one-thread process: robust to a busy
machine), training FLOPs; the expert load by domain of each MoE layer on the held-out documents
(demo_run/moe/expert_load.png), loss curves (demo_run/moe/loss.png). Two runs at a time (2 cores;
MOE_DEMO_JOBS changes it). MOE_DEMO_STEPS (default 2000) sets dense's steps; MOE_DEMO_REPORT_ONLY=1 prints
the report again from the last runs' JSON files.

Measured at 2000 steps (quiet machine, 15:12 wall, 1,700 CPU s): val loss dense 2.1063, moe 2.0437,
moe-noaux 2.1418 (busiest expert 3.44x the mean load, 1.17x with the balancing loss), mod 2.0531 at
dense's training FLOPs (step CPU 0.219 s vs 0.185 s). At 700 steps MoE was 0.013 behind dense.
MoD's causal predictor (generation's router), measured with MOE_DEMO_STEPS=400 (371 MoD steps, not the
default run): on held-out text it agrees with the true top-k on 0.929 of tokens (always skipping: 0.875),
recall 0.516, precision 0.861, processing 7.5% of tokens against top-k's 12.5%; held-out loss when it
routes 3.1164 vs 3.1110 with top-k routing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import torch  # noqa: E402

from moe_domains import DOMAINS, documents  # noqa: E402

OUT = os.path.join(ROOT, "demo_run", "moe")
DATA = os.path.join(OUT, "data")
STEPS = int(os.environ.get("MOE_DEMO_STEPS", 2000))
F, SEQ = 256, 128
BASE = {"model": dict(vocab_size=4096, max_seq_len=SEQ, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4,
                      ffn_hidden_size=2 * F, mlp="swiglu"),
        "train": dict(seq_len=SEQ, micro_batch_size=8, global_batch_size=8, train_iters=STEPS, lr=3e-3, min_lr=3e-4,
                      warmup=50, weight_decay=0.1, eval_interval=0, eval_iters=16, log_interval=10 ** 6,
                      peak_tflops=0.1, seed=1234)}
MOE = dict(moe_num_experts=8, moe_top_k=2, moe_ffn_hidden_size=F, moe_router_norm_topk=True, moe_aux_loss_coeff=0.01)
VARIANTS = {"dense": {}, "moe": MOE, "moe-noaux": dict(MOE, moe_aux_loss_coeff=0.0),
            "mod": dict(num_layers=8, mod_layers=[1, 3, 5, 7], mod_capacity=0.125)}
TRAIN_DOCS, EVAL_DOCS = 2500, 40            # per synthetic domain (Shakespeare: its share of the plays)


def config(name: str, steps: int | None = None):
    from megagpt.config import config_from_dict
    raw = json.loads(json.dumps(BASE))
    raw["model"].update(VARIANTS[name])
    raw["train"]["train_iters"] = steps or STEPS
    return config_from_dict(raw, world_size=1)


def steps_for(name: str) -> int:
    """dense's steps, or for MoD the steps that spend dense's training FLOPs (one formula: config.py)."""
    from megagpt.model_size import flops_per_token
    if name != "mod":
        return STEPS
    return round(STEPS * flops_per_token(config("dense").model, SEQ) / flops_per_token(config("mod").model, SEQ))


def prepare_data() -> str:
    """Training corpus -> DATA/mix.bin/.idx (+ tokenizer.json); held-out documents -> DATA/heldout.json."""
    prefix = os.path.join(DATA, "mix")
    if os.path.exists(prefix + ".idx"):
        print(f"data: reusing {prefix}.bin/.idx")
        return prefix
    from megagpt.data.preprocess import preprocess
    os.makedirs(DATA, exist_ok=True)
    docs = {d: documents(d, TRAIN_DOCS, seed=1) for d in DOMAINS}
    chars = sum(len(t) for d in DOMAINS[:4] for t in docs[d]) / 4    # the plays cut to about one domain's size
    total, keep = 0, []
    for t in docs["shakespeare"]:
        keep.append(t)
        total += len(t)
        if total >= chars:
            break
    docs["shakespeare"] = keep
    jsonl = os.path.join(DATA, "mix.jsonl")
    with open(jsonl, "w") as f:
        for i in range(max(map(len, docs.values()))):           # interleaved: the split takes every domain
            for d in DOMAINS:
                if i < len(docs[d]):
                    f.write(json.dumps({"text": docs[d][i], "domain": d}) + "\n")
    print("data: " + ", ".join(f"{d} {len(docs[d])} docs / {sum(map(len, docs[d])) / 1e6:.1f} MB" for d in DOMAINS))
    preprocess([jsonl], prefix, vocab_size=4096, workers=1, do_filter=False, dedup=False, progress=False, report=False)
    held = {d: documents(d, EVAL_DOCS, seed=2, held_out=True) for d in DOMAINS}
    with open(os.path.join(DATA, "heldout.json"), "w") as f:
        json.dump(held, f)
    return prefix


def heldout_batches(prefix: str) -> dict[str, torch.Tensor]:
    """Per domain: its held-out documents tokenized, joined by the end-of-document token, cut to [n, SEQ + 1]."""
    from megagpt.data.tokenizer import Tokenizer
    tok = Tokenizer.load(os.path.join(os.path.dirname(prefix), "tokenizer.json"))
    out = {}
    for d, docs in json.load(open(os.path.join(DATA, "heldout.json"))).items():
        ids = [i for t in docs for i in tok.encode(t) + [tok.eod_id]]
        n = min(32, len(ids) // (SEQ + 1))
        out[d] = torch.tensor(ids[:n * (SEQ + 1)]).view(n, SEQ + 1)
    return out


@torch.no_grad()
def domain_eval(model, batches: dict) -> tuple[dict, dict, dict]:
    """Per domain: the mean token loss, and each MoE layer's share of selections per expert (the routing
    the layer takes, recorded by a hook on its input). With MoD layers also their causal predictor
    against the true top-k routing on the held-out text (mod_predictor_report), and the held-out loss
    when the predictor routes, as at generation."""
    from megagpt.model.mod import MoDRouter
    from megagpt.model.moe import MoE, route
    model.eval()
    picks, hooks, agree = {}, [], []
    for m in model.modules():
        if isinstance(m, MoE):
            def hook(mod, args, _out):
                logits = args[0].reshape(-1, args[0].shape[-1]).float() @ mod.router().float().t()   # [N, E]
                experts = route(logits, mod.cfg, mod.selection_bias)[1]
                picks[mod.layer_id] = picks.get(mod.layer_id, 0) + torch.bincount(experts.reshape(-1),
                                                                                  minlength=mod.cfg.moe_num_experts)
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, MoDRouter):
            hooks.append(m.register_forward_hook(lambda mod, args, _out: agree.append(mod_predictor_counts(mod, args[0]))))
    losses, load = {}, {}
    for d, batch in batches.items():
        picks.clear()
        losses[d] = model(batch[:, :-1], batch[:, 1:]).mean().item()
        load[d] = {str(k): (v / v.sum()).tolist() for k, v in sorted(picks.items())}
    for h in hooks:
        h.remove()
    mod = {}
    if agree:
        mod = mod_predictor_report(agree)
        model.moe.causal_routing = True                       # the generation rule: the predictor routes
        mod["heldout_loss_predictor_routed"] = sum(model(b[:, :-1], b[:, 1:]).mean().item()
                                                   for b in batches.values()) / len(batches)
        mod["heldout_loss_topk_routed"] = sum(losses.values()) / len(losses)
        model.moe.causal_routing = False
    model.train()
    return losses, load, mod


def mod_predictor_counts(router, x: torch.Tensor) -> torch.Tensor:
    """A MoD layer's input x [s, b, h] -> [agreeing, tokens, true positives, top-k chosen, predicted]."""
    from megagpt.model.mod import mod_keep
    topk = torch.zeros(x.shape[:2], dtype=torch.bool).scatter(0, mod_keep(router._scores(x, router.weight), router.capacity), True)
    guess = router.predict(x)                                                       # [s, b]
    return torch.tensor([(guess == topk).sum(), topk.numel(), (guess & topk).sum(), topk.sum(), guess.sum()])


def mod_predictor_report(counts: list) -> dict:
    agree, n, tp, chosen, guessed = (int(v) for v in torch.stack(counts).sum(0))
    return {"predictor_accuracy": agree / n, "predictor_recall": tp / chosen, "predictor_precision": tp / max(guessed, 1),
            "predicted_fraction": guessed / n, "topk_fraction": chosen / n}


def run_variant(name: str, prefix: str) -> dict:
    """One model, in this process: train, evaluate, return the record."""
    from megagpt.model_size import active_params, count_params, flops_per_token
    from megagpt.parallel.spawn import spawn
    steps = steps_for(name)

    def body(rank, world):
        from megagpt.train import Trainer
        cfg = config(name, steps)
        trainer = Trainer(cfg, os.path.join(OUT, name), prefix)
        losses, times, cpu = [], [], []
        for step in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            losses.append(trainer.train_step()["loss"])
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)          # one thread: robust to a busy machine
            if (step + 1) % 200 == 0:
                print(f"  {name}: step {step + 1}/{steps} loss {sum(losses[-50:]) / 50:.3f}", flush=True)
        val = trainer.evaluate()
        dom_loss, dom_load, mod = domain_eval(trainer.chunks[0], heldout_batches(prefix))
        skip = min(10, steps // 2)                               # warm-up steps
        times, cpu = sorted(times[skip:]), sorted(cpu[skip:])
        return {"val_loss": val, "domain_loss": dom_loss, "domain_load": dom_load, "losses": losses, "mod": mod,
                "step_s_median": times[len(times) // 2], "step_cpu_s_median": cpu[len(cpu) // 2]}
    rec = spawn(1, body, timeout=3600)[0]
    m = config(name).model
    return {"name": name, "steps": steps, **rec, "params_total": count_params(m), "params_active": active_params(m),
            "train_flops": flops_per_token(m, SEQ) * SEQ * BASE["train"]["global_batch_size"] * steps}


def plot_load(results: list, path: str) -> None:
    """Rows: the MoE runs x their layers; each panel: domain x expert, the share of the domain's selections."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in results if r["domain_load"][DOMAINS[0]]]
    layers = sorted(runs[0]["domain_load"][DOMAINS[0]], key=int)
    top = max(max(v) for r in runs for d in DOMAINS for v in r["domain_load"][d].values())
    fig, axes = plt.subplots(len(runs), len(layers), figsize=(3 * len(layers) + 2, 2.8 * len(runs)), squeeze=False)
    for row, r in zip(axes, runs):
        for col, (ax, layer) in enumerate(zip(row, layers)):
            grid = torch.tensor([r["domain_load"][d][layer] for d in DOMAINS])          # [domains, E]
            im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.5, top), aspect="auto")
            ax.set_title(f"{r['name']}  layer {layer}", fontsize=9)
            ax.set_yticks(range(len(DOMAINS)), DOMAINS if col == 0 else [""] * len(DOMAINS), fontsize=8)
            ax.set_xticks(range(grid.shape[1]))
            ax.set_xlabel("expert", fontsize=8)
    fig.suptitle("expert load by domain on held-out documents (uniform = 0.125)", fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the domain's selections")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: list) -> None:
    from megagpt.plot import plot_curves
    by = {r["name"]: r for r in results}
    if any(r["domain_load"][DOMAINS[0]] for r in results):
        plot_load(results, os.path.join(OUT, "expert_load.png"))
    plot_curves({r["name"]: (range(1, r["steps"] + 1), r["losses"]) for r in results}, os.path.join(OUT, "loss.png"))
    print(f"\n{'model':<10} {'steps':>5} {'val loss':>9} " + " ".join(f"{d[:10]:>10}" for d in DOMAINS)
          + f" {'params':>10} {'active':>10} {'train TFLOP':>11} {'step s':>7} {'cpu s':>6}  max/mean expert load per layer")
    for r in results:
        load = [max(v) * len(v) for v in _mean_load(r).values()]
        print(f"{r['name']:<10} {r['steps']:>5} {r['val_loss']:>9.4f} "
              + " ".join(f"{r['domain_loss'][d]:>10.4f}" for d in DOMAINS)
              + f" {r['params_total']:>10,} {r['params_active']:>10,} {r['train_flops'] / 1e12:>11.1f} "
              f"{r['step_s_median']:>7.3f} {r['step_cpu_s_median']:>6.3f}  {' '.join(f'{s:.2f}' for s in load)}")
    verdict = []
    if "dense" in by and "moe" in by:
        d, m = by["dense"]["val_loss"], by["moe"]["val_loss"]
        verdict.append(f"MoE (8 experts, top-2) vs dense at equal active parameters and steps: val loss {m:.4f} vs "
                       f"{d:.4f}: " + ("MoE is better" if m < d else "MoE is NOT better") + f" by {d - m:+.4f}")
    if "dense" in by and "mod" in by:
        d, m = by["dense"], by["mod"]
        verdict.append(f"MoD (8 layers, 12.5% on 4) vs dense (4 layers) at equal training FLOPs "
                       f"({m['train_flops'] / 1e12:.1f} vs {d['train_flops'] / 1e12:.1f} TFLOP): val loss "
                       f"{m['val_loss']:.4f} vs {d['val_loss']:.4f}, step CPU time {m['step_cpu_s_median']:.3f} s vs "
                       f"{d['step_cpu_s_median']:.3f} s: " + ("MoD is better" if m["val_loss"] < d["val_loss"]
                                                         else "MoD is NOT better"))
    if by.get("mod", {}).get("mod"):                          # runs from before the predictor report lack it
        p = by["mod"]["mod"]
        verdict.append(f"MoD causal predictor on held-out text vs the true top-k routing: accuracy "
                       f"{p['predictor_accuracy']:.3f}, recall {p['predictor_recall']:.3f}, precision "
                       f"{p['predictor_precision']:.3f} (always skipping would score {1 - p['topk_fraction']:.3f}), "
                       f"processes {p['predicted_fraction']:.3f} of tokens "
                       f"(top-k {p['topk_fraction']:.3f}); held-out loss routed by the predictor (generation's "
                       f"rule) {p['heldout_loss_predictor_routed']:.4f} vs top-k {p['heldout_loss_topk_routed']:.4f}")
    if "moe" in by and "moe-noaux" in by:
        a, b = (max(max(v) * len(v) for v in _mean_load(by[k]).values()) for k in ("moe", "moe-noaux"))
        verdict.append(f"routing balance on held-out text: busiest expert at {a:.2f}x the mean load with the aux "
                       f"loss, {b:.2f}x without it")
    print("\n".join(verdict))
    print(f"expert load by domain: {os.path.relpath(os.path.join(OUT, 'expert_load.png'), ROOT)}; "
          f"loss curves: {os.path.relpath(os.path.join(OUT, 'loss.png'), ROOT)}")


def _mean_load(r: dict) -> dict:
    """Per MoE layer: its load over all domains (equal weight), [E]."""
    layers = r["domain_load"][DOMAINS[0]]
    return {k: [sum(r["domain_load"][d][k][e] for d in DOMAINS) / len(DOMAINS) for e in range(len(layers[k]))]
            for k in layers}


def main():
    if len(sys.argv) == 3:                      # a child: one variant -> its JSON file
        with open(sys.argv[2], "w") as f:
            json.dump(run_variant(sys.argv[1], os.path.join(DATA, "mix")), f)
        return
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    start = time.time()
    names = os.environ.get("MOE_DEMO_VARIANTS", ",".join(VARIANTS)).split(",")
    paths = {n: os.path.join(OUT, f"{n}.json") for n in names}
    if os.environ.get("MOE_DEMO_REPORT_ONLY"):              # the table and plots again from the runs' JSON
        report([json.load(open(paths[n])) for n in names])
        return
    prepare_data()
    jobs = int(os.environ.get("MOE_DEMO_JOBS", 2))            # runs at a time (2 cores: 2)
    print(f"training {', '.join(f'{n} ({steps_for(n)} steps)' for n in names)}, {jobs} at a time", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for i in range(0, len(names), jobs):
        procs = [subprocess.Popen([sys.executable, __file__, n, paths[n]], env=env) for n in names[i:i + jobs]]
        if any(p.wait() for p in procs):
            raise SystemExit("moe-demo: a training run failed (see above)")
    results = [json.load(open(paths[n])) for n in names]
    report(results)
    print(f"moe-demo: {time.time() - start:.0f} s")
    print(json.dumps({"steps": STEPS, "results": [{k: v for k, v in r.items() if k != "losses"} for r in results]}))


if __name__ == "__main__":
    main()
