"""A bad-input error is the only line the project prints, on stdout and stderr together.

test_train_e2e._expect_error reads stderr only, so an extra line on stdout in the error path (a
"training aborted", a config dump) passed it. Plain python: the console (stdout and stderr merged)
is exactly one line, `error: ...`. Under torchrun (2 ranks, --redirects 3): nothing on the console's
stdout, and each rank's own output (stdout.log and stderr.log) is at most that one line, exactly one
on some rank (a rank the launcher stopped first may have printed nothing)."""
import glob
import os
import subprocess
import sys

import pytest

from test_train_e2e import PRETRAIN, ROOT, SMALL, TINY


@pytest.mark.parametrize("nproc", [0, 2])
def test_bad_input_prints_one_line_in_all(nproc, tmp_path):
    argv = ["--config", TINY, *SMALL, "--train-iters", "2", "--run-dir", str(tmp_path / "err")]
    argv += ["--data", str(tmp_path / "missing")] if not nproc else ["--tp", "3"]
    fragment = "missing.idx" if not nproc else "parallel.tp=3"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "--redirects", "3", "--log-dir", str(tmp_path / "logs")] if nproc else [sys.executable]
    out = subprocess.run([*launcher, PRETRAIN, *argv], stdout=subprocess.PIPE, cwd=ROOT, timeout=120, text=True,
                         stderr=subprocess.PIPE if nproc else subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode != 0
    if not nproc:
        lines = out.stdout.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stdout[-3000:]
        return
    assert out.stdout == "", out.stdout[-3000:]
    counts = []
    for rank in range(nproc):
        [logs] = glob.glob(str(tmp_path / "logs" / "*" / "attempt_0" / str(rank)))
        printed = [line for name in ("stdout.log", "stderr.log") for line in open(os.path.join(logs, name))]
        assert len(printed) <= 1, f"rank {rank} printed {printed}"
        assert all(t.startswith("error: ") and fragment in t for t in printed), printed
        counts.append(len(printed))
    assert max(counts) == 1, "no rank printed the error"
