"""megagpt against picotron (huggingface/picotron) on the CPU, side by side: a note, not part of the suite.

picotron is not on PyPI: clone it outside the project and apply bench/picotron_cpu.patch (CPU/gloo and
transformers-5 fixes only; see bench/README.md), then

    python bench/vs_picotron.py [--picotron /work/picotron] [--steps 50] [--reps 3] [--layouts ...]

Both engines train the issue-18 Llama shape (hidden 256, 8 layers, 8 heads / 2 KV, SwiGLU 704, vocab
8192, untied, fp32, seq 256, 8 sequences = 2048 tokens a step, micro batch 2) on the same synthetic
token stream (megagpt's SyntheticDataset, fed to picotron as text through a word-level tokenizer
"t0".."t8191"). Every repetition runs each layout of both engines, alternating which engine goes first
and reversing the layout order on odd repetitions. A run's figure is the median step time over steps
6..N (steps 1-5 are warm-up); tokens/s = 2048 / that. Ratios are taken per repetition (same minute of
the machine) and reported as median [min, max]. RSS is the peak resident set of each rank process
(ru_maxrss). Two extra megagpt rows run the opt-in train.compile (1 process, DP2), each compared with
picotron's eager row of that layout. Results: bench/out/vs_picotron.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from one_process import MODEL, TRAIN, raw_config  # noqa: E402  (the one home of the issue-18 shape)

from megagpt.config import config_from_dict  # noqa: E402
from megagpt.data.synthetic import SyntheticDataset  # noqa: E402
from megagpt.parallel.spawn import free_port, spawn  # noqa: E402

TOKENS = TRAIN["global_batch_size"] * TRAIN["seq_len"]
PROBE_DIR = os.path.join(ROOT, "bench", "picotron_probe")   # sitecustomize: picotron's CPU clocks per step
WARM = 5                     # steps 1..5 are warm-up; the median is over steps 6..N
# name: (world, threads per rank, picotron distributed sizes or None, megagpt parallel, megagpt train overrides)
LAYOUTS = {
    "1p 2 threads": (1, 2, {}, {}, {}),
    "1p 1 thread": (1, 1, {}, {}, {}),                              # how each engine scales to 2 threads
    "DP2": (2, 1, dict(dp_size=2), {}, dict(dp_mode="ddp")),
    "DP2 ZeRO-1": (2, 1, None, {}, dict(dp_mode="zero1")),
    "TP2": (2, 1, dict(tp_size=2), dict(tp=2), {}),
    "TP2 + SP": (2, 1, None, dict(tp=2, sequence_parallel=True), {}),
    "PP2": (2, 1, dict(pp_size=2), dict(pp=2), {}),
    "PP2 vp2": (2, 1, None, dict(pp=2, vp=2), {}),
    "1p 2t compile": (1, 2, None, {}, dict(compile=True)),          # train.compile: true (opt-in)
    "DP2 compile": (2, 1, None, {}, dict(dp_mode="ddp", compile=True)),
}
BASELINE = "1p 2 threads"
PEER = {"DP2 ZeRO-1": "DP2", "TP2 + SP": "TP2", "PP2 vp2": "PP2", "1p 2t compile": "1p 2 threads",
        "DP2 compile": "DP2"}   # megagpt-only rows: compared with this picotron row


# ----------------------------------------------------------------------------- picotron side

def prepare_picotron(work: str, rows: int) -> dict:
    """Model config, word-level tokenizer, text dataset and a (re-initialised) safetensors under `work`."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    h, f, v, kv = MODEL["hidden_size"], MODEL["ffn_hidden_size"], MODEL["vocab_size"], MODEL["num_kv_heads"]
    hd = h // MODEL["num_heads"]
    model_dir, data_dir = os.path.join(work, "model"), os.path.join(work, "data")
    os.makedirs(data_dir, exist_ok=True)
    LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=MODEL["num_layers"],
                num_attention_heads=MODEL["num_heads"], num_key_value_heads=kv, head_dim=hd, vocab_size=v,
                max_position_embeddings=TRAIN["seq_len"], rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False).save_pretrained(model_dir)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(v)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(model_dir)
    data = SyntheticDataset(v, TRAIN["seq_len"], rows, seed=1234)
    with open(os.path.join(data_dir, "train.jsonl"), "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"text": " ".join(f"t{x}" for x in data[i][:TRAIN["seq_len"]])}) + "\n")
    # picotron loads shapes from ./hf_model_safetensors, then re-initialises every weight (reset_parameters)
    w = {"model.embed_tokens.weight": torch.zeros(v, h), "model.norm.weight": torch.ones(h)}
    for i in range(MODEL["num_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                  p + "self_attn.q_proj.weight": torch.zeros(h, h), p + "self_attn.o_proj.weight": torch.zeros(h, h),
                  p + "self_attn.k_proj.weight": torch.zeros(kv * hd, h),
                  p + "self_attn.v_proj.weight": torch.zeros(kv * hd, h),
                  p + "mlp.gate_proj.weight": torch.zeros(f, h), p + "mlp.up_proj.weight": torch.zeros(f, h),
                  p + "mlp.down_proj.weight": torch.zeros(h, f)})
    os.makedirs(os.path.join(work, "hf_model_safetensors"), exist_ok=True)
    save_file(w, os.path.join(work, "hf_model_safetensors", "model.safetensors"))
    return {"model": model_dir, "data": data_dir}


def picotron_config(sizes: dict, world: int, threads: int, steps: int, paths: dict, work: str) -> dict:
    dp = sizes.get("dp_size", 1)
    acc = TRAIN["global_batch_size"] // (TRAIN["micro_batch_size"] * dp)
    return {
        "distributed": {"tp_size": 1, "cp_size": 1, "pp_size": 1, "dp_size": 1, **sizes, "pp_engine": "1f1b",
                        "backend": "gloo", "use_cpu": True},
        "model": {"name": paths["model"], "num_hidden_layers": MODEL["num_layers"],
                  "num_attention_heads": MODEL["num_heads"], "num_key_value_heads": MODEL["num_kv_heads"],
                  "dtype": "float32", "use_flash_attention": False, "use_fused_adam": False},
        "training": {"seed": 42, "learning_rate": 3e-4, "total_train_steps": steps, "seq_length": TRAIN["seq_len"],
                     "micro_batch_size": TRAIN["micro_batch_size"], "gradient_accumulation_steps": acc,
                     "num_samples": None, "max_tokens": None},
        "dataset": {"name": paths["data"], "subset_name": None, "num_workers": 0, "num_proc": 1},
        "checkpoint": {"save_dir": os.path.join(work, "ckpt"), "save_frequency": 10 ** 9, "load_path": ""},
        "logging": {"use_wandb": False, "project_name": "picotron", "run_name": "cpu"},
        "environment": {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "FLASH_ATTEN": "0",
                        "HF_TOKEN": "unused"},
    }


def run_picotron(name: str, steps: int, picotron: str, work: str, paths: dict) -> dict:
    world, threads, sizes, _, _ = LAYOUTS[name]
    cfg_path = os.path.join(work, "config.json")
    with open(cfg_path, "w") as fh:
        json.dump(picotron_config(sizes, world, threads, steps, paths, work), fh)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DTYPE": "float32",
           "PYTHONPATH": os.pathsep.join([PROBE_DIR, picotron]), "VS_PICOTRON_PROBE": "1",
           "HF_HOME": os.path.join(work, "hf_home"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = []
    for r in range(world):
        log = open(os.path.join(work, f"rank{r}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, os.path.join(picotron, "train.py"), "--config", cfg_path],
                                       cwd=work, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                       stdout=log, stderr=subprocess.STDOUT), log))
    rss, rcs = [], []
    for p, log in procs:
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        rss.append(ru.ru_maxrss / 1024)
        rcs.append(p.returncode)
    texts = [open(os.path.join(work, f"rank{r}.log")).read() for r in range(world)]
    text = "".join(texts)
    if any(rcs):
        raise RuntimeError(f"picotron {name} failed (exit codes {rcs}):\n{text[-3000:]}")
    walls = [float(x) for x in re.findall(r"Step time: ([0-9.]+)s", text)]
    losses = [float(x) for x in re.findall(r"Loss: +([0-9.]+)", text)]
    if len(walls) != steps:
        raise RuntimeError(f"picotron {name}: {len(walls)} step times for {steps} steps:\n{text[-3000:]}")
    clocks = [[[float(x) for x in m] for m in re.findall(r"VS_PICOTRON_PROBE ([0-9.]+) ([0-9.]+) ([0-9.]+)", t)]
              for t in texts]                    # per rank, after each optimizer step: process, thread CPU, wall
    if any(len(c) != steps for c in clocks):
        raise RuntimeError(f"picotron {name}: CPU probe lines {[len(c) for c in clocks]} for {steps} steps")
    # a step's CPU: between two optimizer steps (step 1 has no start mark: its window begins with step 2)
    cpus = [[(c[i][k] - c[i - 1][k] if i else float("nan")) for i in range(steps)] for c in clocks for k in (0, 1)]
    return {"walls": walls, "losses": losses, "rss_mb": rss, "threads": [threads] * world,
            "cpu_s": cpus[0::2], "main_cpu_s": cpus[1::2]}


# ----------------------------------------------------------------------------- megagpt side

def _megagpt_worker(rank, world, raw, steps, threads):
    import contextlib
    import io

    from megagpt.train import Trainer
    torch.set_num_threads(threads)
    cfg = config_from_dict(raw, world)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, run_dir=os.devnull)
    walls, losses, cpus, mains = [], [], [], []
    for _ in range(steps):
        t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        stats = trainer.train_step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)        # all threads of this rank (OpenMP, gloo)
        mains.append(time.thread_time() - m0)         # the main thread only
        losses.append(float(stats["loss"]))
    return {"walls": walls, "losses": losses, "cpu_s": cpus, "main_cpu_s": mains, "threads": torch.get_num_threads(),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_megagpt(name: str, steps: int) -> dict:
    world, threads, _, par, train = LAYOUTS[name]
    res = spawn(world, _megagpt_worker, raw_config(par, steps, train), steps, threads, timeout=1800)
    walls = [max(r["walls"][i] for r in res) for i in range(steps)]     # a step ends with its slowest rank
    return {"walls": walls, "losses": res[-1]["losses"], "rss_mb": [r["rss_mb"] for r in res],
            "threads": [r["threads"] for r in res], "cpu_s": [r["cpu_s"] for r in res],
            "main_cpu_s": [r["main_cpu_s"] for r in res]}


# ----------------------------------------------------------------------------- the table

def _cpu_ms(per_rank: list[list[float]]) -> float:
    """ms of CPU per step and rank: the median over steps WARM+1.. of the ranks' mean (load does not enter)."""
    return 1e3 * statistics.median(statistics.mean(r[i] for r in per_rank) for i in range(WARM, len(per_rank[0])))


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def targets(table: dict) -> list[str]:
    """Issue 18's bars, each MET or NOT MET with the median ratio and its [min, max]."""
    def get(n, key):
        return table.get(n, {}).get(key)
    checks = [(f"megagpt / picotron, {n} >= 1.1", get(n, "megagpt_vs_picotron"), 1.1)
              for n in ("1p 2 threads", "DP2", "TP2", "PP2")]
    checks += [(f"(opt-in train.compile) megagpt {n} / picotron {PEER[n]} >= 1.1", get(n, "megagpt_vs_picotron"), 1.1)
               for n in ("1p 2t compile", "DP2 compile")]
    checks += [("megagpt DP2 / own 1p >= 1.0", get("DP2", "megagpt_vs_own_1p"), 1.0),
               ("megagpt TP2 / own 1p >= 0.8", get("TP2", "megagpt_vs_own_1p"), 0.8)]
    vp1, vp2 = get("PP2", "megagpt_rep_median_s"), get("PP2 vp2", "megagpt_rep_median_s")
    both = [k for k in (vp1 or {}) if k in (vp2 or {})]
    if both:                                              # per repetition: the two ran minutes apart
        checks.append(("megagpt PP2 vp2 / PP2 vp1 >= 1.0", _spread([vp1[k] / vp2[k] for k in both]), 1.0))
    out = []
    for name, s, bar in checks:
        if s is None:
            out.append(f"  {name}: not measured in this run")
        else:
            out.append(f"  {name}: {'MET' if s['median'] >= bar else 'NOT MET'} "
                       f"({s['median']:.2f}, rounds [{s['min']:.2f}, {s['max']:.2f}])")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--prepare"]:
        prepare_picotron(argv[1], int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--picotron", default=os.environ.get("PICOTRON_DIR", "/work/picotron"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layouts", nargs="*", default=list(LAYOUTS), help=f"subset of {list(LAYOUTS)}")
    ap.add_argument("--engines", nargs="*", default=["megagpt", "picotron"], help="both by default")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "vs_picotron.json"))
    args = ap.parse_args(argv)
    bad = [n for n in args.layouts if n not in LAYOUTS]
    if bad or not os.path.exists(os.path.join(args.picotron, "picotron", "model.py")) or args.steps <= WARM:
        print(f"vs_picotron: expected --layouts from {list(LAYOUTS)}, --steps > {WARM} and a patched picotron "
              f"checkout at --picotron (got {bad or args.picotron})", file=sys.stderr)
        return 2
    torch.set_num_threads(1)            # forked ranks need a one-thread parent
    work = tempfile.mkdtemp(prefix="vs-picotron-")
    # in a child: transformers' import would otherwise sit in this process's pages, which megagpt's
    # forked ranks inherit and would count in their resident set
    subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", work,
                    str(TRAIN["global_batch_size"] * (args.steps + 2))], check=True)
    paths = {"model": os.path.join(work, "model"), "data": os.path.join(work, "data")}
    names = [n for n in LAYOUTS if n in args.layouts]
    # run order: two-rank layouts first, one-process ones last; odd repetitions reverse it, so the 2-thread
    # runs (the most sensitive to other load: an OpenMP barrier waits for a descheduled thread) sit together
    # in the middle of the measurement
    order = sorted(names, key=lambda n: -LAYOUTS[n][0])
    runs = {(e, n): [] for n in names for e in ("megagpt", "picotron")}
    loads = [os.getloadavg()[0]]
    failures: list[str] = []
    try:
        for rep in range(args.reps):
            for n in (order if rep % 2 == 0 else order[::-1]):
                engines = ["megagpt", "picotron"] if rep % 2 == 0 else ["picotron", "megagpt"]
                for e in engines:
                    if e not in args.engines or (e == "picotron" and LAYOUTS[n][2] is None):
                        continue
                    try:
                        r = run_megagpt(n, args.steps) if e == "megagpt" else \
                            run_picotron(n, args.steps, args.picotron, work, paths)
                    except Exception as exc:  # noqa: BLE001 -- one failed run must not lose the others
                        failures.append(f"rep {rep} {e} {n}: {str(exc).splitlines()[0]}")
                        print(f"  FAILED: {failures[-1]}", flush=True)
                        continue
                    r["median_s"], r["rep"] = statistics.median(r["walls"][WARM:]), rep
                    r["cpu_ms"], r["main_cpu_ms"] = _cpu_ms(r["cpu_s"]), _cpu_ms(r["main_cpu_s"])
                    r["load"] = os.getloadavg()[0]
                    runs[(e, n)].append(r)
                    report(runs, names, loads, failures, args, rep + 1, show=False)
                    print(f"  rep {rep} {e:8} {n:13} {TOKENS / r['median_s']:6.0f} tok/s  CPU/rank "
                          f"{r['cpu_ms']:.0f} ms (main thread {r['main_cpu_ms']:.0f})  rss "
                          f"{'/'.join(f'{x:.0f}' for x in r['rss_mb'])} MB  threads {r['threads']}  "
                          f"loss {r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}  load {r['load']:.1f}", flush=True)
                loads.append(os.getloadavg()[0])
            # after every repetition: a run cut short still leaves the table of the repetitions done
            report(runs, names, loads, failures, args, rep + 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(runs: dict, names: list[str], loads: list[float], failures: list[str], args, reps_done: int,
           show: bool = True) -> None:
    """Write args.out from the runs done so far (the repetitions begun); print the table and the bars if show."""
    say = print if show else (lambda *a, **k: None)
    for line in failures:
        say(f"  FAILED: {line}")
    base = {r["rep"]: r["median_s"] for r in runs.get(("megagpt", BASELINE), [])}

    def paired(a: list, b) -> list[tuple[float, float]]:   # (a's, b's) median step of each repetition both ran
        other = b if isinstance(b, dict) else {r["rep"]: r["median_s"] for r in b}
        return [(r["median_s"], other[r["rep"]]) for r in a if r["rep"] in other]

    table = {}
    for n in names:
        m = runs[("megagpt", n)]
        if not m:
            continue
        row = {"megagpt_tok_s": _spread([TOKENS / r["median_s"] for r in m]),
               "megagpt_rss_mb_max": max(max(r["rss_mb"]) for r in m),
               "megagpt_threads": m[0]["threads"], "megagpt_rep_median_s": {r["rep"]: r["median_s"] for r in m},
               "megagpt_loss_first_last": [m[0]["losses"][0], m[0]["losses"][-1]],
               "megagpt_cpu_ms": _spread([r["cpu_ms"] for r in m]),
               "megagpt_main_cpu_ms": _spread([r["main_cpu_ms"] for r in m])}
        if paired(m, base):
            row["megagpt_vs_own_1p"] = _spread([b / a for a, b in paired(m, base)])
        p = runs.get(("picotron", PEER.get(n, n)), [])
        if paired(m, p):
            row.update({"picotron_tok_s": _spread([TOKENS / r["median_s"] for r in p]),
                        "picotron_rss_mb_max": max(max(r["rss_mb"]) for r in p),
                        "picotron_threads": p[0]["threads"],
                        "picotron_loss_first_last": [p[0]["losses"][0], p[0]["losses"][-1]],
                        "picotron_layout": PEER.get(n, n),
                        "megagpt_vs_picotron": _spread([b / a for a, b in paired(m, p)]),
                        "picotron_cpu_ms": _spread([r["cpu_ms"] for r in p]),
                        "picotron_main_cpu_ms": _spread([r["main_cpu_ms"] for r in p])})
            pc = {r["rep"]: r["cpu_ms"] for r in p}     # by CPU per rank: picotron's / megagpt's, same repetition
            row["megagpt_vs_picotron_cpu"] = _spread([pc[r["rep"]] / r["cpu_ms"] for r in m if r["rep"] in pc])
        table[n] = row

    def fmt(s, f="{:.0f}"):
        return f"{f.format(s['median'])} [{f.format(s['min'])}, {f.format(s['max'])}]" if s else "-"
    def cpu(c, main):
        return f"{c['median']:.0f} ({main['median']:.0f})" if c else "-"
    say(f"\nmedian tok/s over steps {WARM + 1}-{args.steps}, {reps_done} of {args.reps} repetitions: "
        f"median [min, max]; load {min(loads):.1f}-{max(loads):.1f}")
    say(f"{'layout':13} | {'picotron tok/s':>20} | {'megagpt tok/s':>20} | {'mg / pico (its row)':>26} | "
        f"{'mg / own 1p':>18} | RSS MB pico / mg | CPU ms/step/rank pico / mg (main thread) | mg / pico by CPU")
    for n, row in table.items():
        vs = f"{fmt(row.get('megagpt_vs_picotron'), '{:.2f}')} ({row.get('picotron_layout', '-')})"
        say(f"{n:13} | {fmt(row.get('picotron_tok_s')):>20} | {fmt(row['megagpt_tok_s']):>20} | {vs:>26} | "
            f"{fmt(row.get('megagpt_vs_own_1p'), '{:.2f}'):>18} | "
            f"{row.get('picotron_rss_mb_max', float('nan')):.0f} / {row['megagpt_rss_mb_max']:.0f} | "
            f"{cpu(row.get('picotron_cpu_ms'), row.get('picotron_main_cpu_ms'))} / "
            f"{cpu(row['megagpt_cpu_ms'], row['megagpt_main_cpu_ms'])} | {fmt(row.get('megagpt_vs_picotron_cpu'), '{:.2f}')}")
    verdicts = targets(table)
    for line in verdicts:
        say(line)
    out = {"targets": verdicts, "failures": failures, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "model": MODEL, "train": TRAIN, "steps": args.steps,
           "warmup_steps": WARM, "reps": reps_done, "torch": torch.__version__, "cores": os.cpu_count(),
           "load_avg": loads,
           "table": table, "runs": {f"{e} | {n}": rs for (e, n), rs in runs.items() if rs}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    say(f"results: {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
