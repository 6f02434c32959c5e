"""Pretraining end to end: layout equivalence through metrics.jsonl, exact resume after kill -9,
clear errors on bad input, and a two-launcher multi-node run on localhost."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dist import spawn
from megagpt.parallel.spawn import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "configs", "tiny.yaml")
PRETRAIN = os.path.join(ROOT, "examples", "pretrain.py")
SMALL = ["model.hidden_size=64", "model.ffn_hidden_size=192", "train.seq_len=32"]


def _cli(rank, world, argv):
    from megagpt.cli import main
    rc = main(argv)
    if rc:
        raise SystemExit(f"pretrain exited with {rc}")
    return rc


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
            if "loss" in r}


def test_layout_equivalence_tp2_pp2_dp2(tmp_path):
    """The same tiny fp32 config for 20 steps: 1 rank (tp1 pp1) against 8 ranks (tp2 pp2 dp2, SP)."""
    base = ["--config", TINY, "--train-iters", "20", *SMALL, "train.eval_interval=0"]
    spawn(1, _cli, base + ["--tp", "1", "--pp", "1", "--run-dir", str(tmp_path / "a")], timeout=300)
    spawn(8, _cli, base + ["--tp", "2", "--pp", "2", "--run-dir", str(tmp_path / "b"),
                           "parallel.sequence_parallel=true"], timeout=300)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    diffs = [abs(a[s] - b[s]) for s in a]
    assert max(diffs) < 1e-4, diffs
    assert a[20] < a[1]  # and it learned something


def _torchrun(args, nproc=2, env_extra=None, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           PRETRAIN, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300, check=check)


@pytest.mark.parametrize("fault", ["step:7", "save:8"])
def test_resume_after_kill_is_exact(tmp_path, fault):
    """kill -9 during a step, or during a save; restart with --load: later losses equal an uninterrupted run."""
    common = ["--config", TINY, *SMALL, "--tp", "2", "--save-interval", "4", "train.eval_interval=0",
              "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
    full = tmp_path / "full"
    _torchrun(common + ["--train-iters", "12", "--run-dir", str(full)])
    broken = tmp_path / "broken"
    out = _torchrun(common + ["--train-iters", "12", "--run-dir", str(broken)],
                    env_extra={"MEGAGPT_FAULT": fault}, check=False)
    assert out.returncode != 0, "the fault did not fire"
    # the killed save left no published step 8 (and a killed step left nothing past step 4)
    assert not (broken / "step_00000008").exists()
    assert (broken / "latest").read_text().strip() == "step_00000004"
    # the partial checkpoint of the killed save is never loaded: the last complete one is step 4
    out = _torchrun(common + ["--train-iters", "12", "--run-dir", str(broken), "--load", str(broken)])
    resumed_at = 4
    assert f"at step {resumed_at} " in out.stdout + out.stderr, out.stdout[-2000:]
    a, b = _losses(full), _losses(broken)
    for step in range(resumed_at + 1, 13):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical


def test_train_iters_counts_from_zero(tmp_path):
    common = ["--config", TINY, *SMALL, "train.eval_interval=0"]
    run = tmp_path / "r"
    spawn(1, _cli, common + ["--train-iters", "6", "--save-interval", "6", "--run-dir", str(run)], timeout=120)
    spawn(1, _cli, common + ["--train-iters", "9", "--run-dir", str(run), "--load", str(run)], timeout=120)
    steps = sorted(_losses(run))
    assert steps == list(range(1, 10)), steps
    assert os.path.exists(run / "loss.png")


def _expect_error(argv, fragment, tmp_path, nproc=0):
    """The command fails before any step, each failing rank printing exactly one line, `error: ...`
    naming `fragment`, on stderr. nproc 0: plain `python pretrain.py`, whose whole stderr must be that
    line. nproc > 0: under torchrun, each rank's stderr (kept by --log-dir) holds at most one line, and
    exactly one for each rank the launcher reports as failed with exit code 2 (a rank it stopped first
    with SIGTERM may have printed nothing); on the console (--tee prefixes [defaultN]:) each comes
    before the launcher's own report (its ChildFailedError traceback)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--tee", "3", "--log-dir", str(tmp_path / "logs")] if nproc else [sys.executable]
    out = subprocess.run([*launcher, PRETRAIN, *argv, "--run-dir", str(tmp_path / "err")], capture_output=True,
                         text=True, cwd=ROOT, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode != 0
    assert not os.path.exists(tmp_path / "err" / "metrics.jsonl")  # no step ran
    lines = out.stderr.splitlines()
    if not nproc:
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr[-3000:]
        return
    report_at = next(i for i, line in enumerate(lines) if "ChildFailedError" in line)   # the launcher's report
    codes = dict(re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\n\s*exitcode\s*:\s*(-?\d+)", out.stderr))
    assert "2" in codes.values(), out.stderr[-3000:]
    for rank in range(nproc):                        # each rank's own stderr, as --log-dir kept it
        [log] = glob.glob(str(tmp_path / "logs" / "*" / "attempt_0" / str(rank) / "stderr.log"))
        printed = open(log).read().splitlines()
        allowed = (1,) if codes.get(str(rank)) == "2" else (0, 1)
        assert len(printed) in allowed, f"rank {rank} (exit code {codes.get(str(rank))}) printed {printed}"
        for text in printed:
            assert text.startswith("error: ") and fragment in text, printed
            assert lines.index(f"[default{rank}]:{text}") < report_at, out.stderr[-3000:]


def _make_data(prefix, vocab=2048, docs=50):
    from megagpt.data.indexed import IndexedDatasetBuilder
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(prefix, np.uint16, vocab, "f" * 16, vocab - 1) as builder:
        for _ in range(docs):
            builder.add_doc(rng.integers(0, vocab - 1, size=int(rng.integers(20, 200))))
        builder.finalize()


def test_bad_inputs_fail_before_training(tmp_path):
    base = ["--config", TINY, *SMALL, "--train-iters", "2"]
    _expect_error(base + ["--data", str(tmp_path / "missing")], "missing", tmp_path)
    prefix = str(tmp_path / "d")
    _make_data(prefix)
    open(prefix + ".bin", "r+b").truncate(100)
    _expect_error(base + ["--data", prefix], ".bin", tmp_path)
    empty = str(tmp_path / "e")
    open(empty + ".bin", "wb").close()
    open(empty + ".idx", "wb").close()
    _expect_error(base + ["--data", empty], "empty", tmp_path)
    other = str(tmp_path / "o")
    _make_data(other, vocab=5000)
    _expect_error(base + ["--data", other], "vocab", tmp_path)
    _expect_error(base + ["--tp", "3"], "parallel.tp=3", tmp_path, nproc=2)


def test_incompatible_checkpoint_is_refused(tmp_path):
    run = tmp_path / "r"
    spawn(1, _cli, ["--config", TINY, *SMALL, "--train-iters", "2", "--save-interval", "2",
                    "train.eval_interval=0", "--run-dir", str(run)], timeout=120)
    _expect_error(["--config", TINY, "--train-iters", "4", "--load", str(run)], "hidden_size", tmp_path)


def test_two_launchers_multinode_localhost(tmp_path):
    """--nnodes=2 with a localhost rendezvous: two torchrun launchers form one world of 2 ranks."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}", "--nproc-per-node=1",
         "--rdzv-backend=static", "--master-addr=127.0.0.1", f"--master-port={port}", PRETRAIN,
         "--config", TINY, *SMALL, "--tp", "2", "--train-iters", "3", "train.eval_interval=0",
         "--run-dir", str(tmp_path / "mn")], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(_losses(tmp_path / "mn")) == [1, 2, 3]


def test_blended_data_trains(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _make_data(a)
    _make_data(b, docs=80)
    spawn(2, _cli, ["--config", TINY, *SMALL, "--tp", "2", "--train-iters", "3", "train.eval_interval=0",
                    f"data.blend=[0.3, {a}, 0.7, {b}]", "--run-dir", str(tmp_path / "r")], timeout=120)
    assert sorted(_losses(tmp_path / "r")) == [1, 2, 3]


def test_interleaved_with_uneven_chunks_matches_one_rank(tmp_path):
    """5 layers over pp2 x vp2 = 4 chunks (uneven, balanced for the LM head), DP2: same losses as 1 rank."""
    base = ["--config", TINY, *SMALL, "model.num_layers=5", "--train-iters", "4", "train.eval_interval=0"]
    spawn(1, _cli, base + ["--run-dir", str(tmp_path / "a")], timeout=120)
    spawn(4, _cli, base + ["--pp", "2", "--vp", "2", "--run-dir", str(tmp_path / "b")], timeout=180)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
