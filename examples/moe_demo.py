"""make moe-demo: dense vs mixture of experts at equal active parameters, and mixture of depths, on Shakespeare.

Every model is the same tiny decoder (the make-demo data: Shakespeare, BPE 4096) trained in one process
for the same steps, batches and learning-rate schedule by the project's Trainer:
  dense        SwiGLU MLP of width 2f
  moe          8 SwiGLU experts of width f, top-2, load-balancing loss 0.01: the same active MLP
               parameters per token as dense (plus an 8 x h router), 4x its MLP parameters in total
  moe-noaux    the same without the balancing loss (does the routing collapse?)
  mod          dense, with mixture of depths at 12.5% capacity on every other layer
Printed: a table (validation loss, parameters total/active, step time) and JSON; written: the expert
load of each MoE layer over training (demo_run/moe/expert_load.png: with and without the aux loss).
"""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import torch  # noqa: E402

OUT = os.path.join(ROOT, "demo_run", "moe")
STEPS = int(os.environ.get("MOE_DEMO_STEPS", 200))
F = 256
BASE = {"model": dict(vocab_size=4096, max_seq_len=128, hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4,
                      ffn_hidden_size=2 * F, mlp="swiglu"),
        "train": dict(seq_len=128, micro_batch_size=8, global_batch_size=8, train_iters=STEPS, lr=3e-3, min_lr=3e-4,
                      warmup=30, weight_decay=0.1, eval_interval=0, eval_iters=16, log_interval=10 ** 6,
                      peak_tflops=0.1, seed=1234)}
MOE = dict(moe_num_experts=8, moe_top_k=2, moe_ffn_hidden_size=F, moe_aux_loss_coeff=0.01)
VARIANTS = {"dense": {}, "moe": MOE, "moe-noaux": dict(MOE, moe_aux_loss_coeff=0.0),
            "mod": dict(mod_layers=[1, 3], mod_capacity=0.125)}
if os.environ.get("MOE_DEMO_VARIANTS"):            # e.g. MOE_DEMO_VARIANTS=dense,moe for a longer run of two
    VARIANTS = {k: VARIANTS[k] for k in os.environ["MOE_DEMO_VARIANTS"].split(",")}


def params(model) -> tuple[int, int]:
    """(total, active per token): an expert weight counts top_k/E of its size as active; MoD layers count whole."""
    total = active = 0
    for p in model.parameters():
        total += p.numel()
        m = model.cfg
        active += p.numel() * (m.moe_top_k / m.moe_num_experts if getattr(p, "meta", None) and p.meta.expert else 1)
    return total, int(active)


def _train(rank, world, name, prefix):
    from megagpt.config import config_from_dict
    from megagpt.train import Trainer
    raw = json.loads(json.dumps(BASE))
    raw["model"].update(VARIANTS[name])
    cfg = config_from_dict(raw, world_size=1)
    trainer = Trainer(cfg, os.path.join(OUT, name), prefix)
    model = trainer.chunks[0]
    load, losses, times = {}, [], []
    for _ in range(STEPS):
        start = time.perf_counter()
        rec = trainer.train_step()
        times.append(time.perf_counter() - start)
        losses.append(rec["loss"])
        for layer, counts in model.moe.load.items():
            load[layer] = load.get(layer, 0) + counts.double()
    trainer.optimizer.finish_param_sync()
    val = trainer.evaluate()
    total, active = params(model)
    times = sorted(times[10:])
    return {"name": name, "val_loss": val, "train_loss_last20": sum(losses[-20:]) / 20,
            "params_total": total, "params_active": active, "step_s_median": times[len(times) // 2],
            "load": {str(k): (v / v.sum()).tolist() for k, v in load.items()}}


def plot_load(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in results if r["load"]]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, r in zip(axes[0], runs):
        grid = torch.tensor([r["load"][k] for k in sorted(r["load"], key=int)])
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(0.5, grid.max().item()), aspect="auto")
        ax.set_title(f"{r['name']}: share of selections")
        ax.set_yticks(range(grid.shape[0]), sorted(r["load"], key=int))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    from demo import prepare_data
    from megagpt.parallel.spawn import spawn
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    prefix = prepare_data()
    results = []
    for name in VARIANTS:
        print(f"training {name} for {STEPS} steps ...", flush=True)
        results.append(spawn(1, _train, name, prefix, timeout=3600)[0])
    if any(r["load"] for r in results):
        plot_load(results, os.path.join(OUT, "expert_load.png"))
    print(f"\n{'model':<10} {'val loss':>9} {'train loss':>11} {'params':>10} {'active':>10} {'step s':>8}  "
          f"max/mean expert load per layer")
    for r in results:
        skew = [max(v) * len(v) for _, v in sorted(r["load"].items(), key=lambda kv: int(kv[0]))]
        print(f"{r['name']:<10} {r['val_loss']:>9.4f} {r['train_loss_last20']:>11.4f} {r['params_total']:>10,} "
              f"{r['params_active']:>10,} {r['step_s_median']:>8.3f}  {' '.join(f'{s:.2f}' for s in skew)}")
    print(f"expert load heatmap: {os.path.relpath(os.path.join(OUT, 'expert_load.png'), ROOT)}")
    print(json.dumps({"steps": STEPS, "results": results}))


if __name__ == "__main__":
    main()
