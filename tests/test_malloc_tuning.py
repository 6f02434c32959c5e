"""train.malloc_tuning: glibc serves big tensors from its heap (kept for reuse) instead of a fresh mmap each."""
import ctypes
import platform
import subprocess
import sys

import pytest

from megagpt.malloc_tuning import tune_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a fresh interpreter: the MiB of mmapped blocks (mallinfo2's hblkhd) that one 30 MiB tensor adds. glibc's
# default threshold (128 KiB, raised only by frees) gives it its own mmap, unmapped on free, so every
# such tensor faults its pages in again; tuned (32 MiB) it comes from the heap, where freed memory stays.
PROBE = """
import ctypes, sys, torch
from megagpt.malloc_tuning import tune_malloc
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "tuned":
    tune_malloc("cpu")
before = libc.mallinfo2().hblkhd
t = torch.ones(30 * 2 ** 18)
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


def mmapped_mib(arm: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, arm], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL("libc.so.6") if GLIBC else None, "mallinfo2"),
                    reason="glibc >= 2.33 only")
def test_tuned_malloc_serves_big_tensors_from_the_heap():
    assert mmapped_mib("default") == 30, "with glibc's defaults a 30 MiB tensor is its own mmap"
    assert mmapped_mib("tuned") == 0


def test_says_what_it_did():
    assert "not applied on cuda" in tune_malloc("cuda")
    if GLIBC:
        assert "keeps freed blocks" in tune_malloc("cpu")


def _said(rank, world, on):
    """The train.malloc_tuning lines a Trainer's start-up prints on this rank."""
    import contextlib
    import io
    import os

    from megagpt.config import config_from_dict
    from megagpt.train import Trainer
    cfg = config_from_dict({"model": dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn_hidden_size=64,
                                          vocab_size=64, max_seq_len=16),
                            "train": dict(seq_len=16, micro_batch_size=1, global_batch_size=2, train_iters=1,
                                          eval_interval=0, malloc_tuning=on)}, world)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        Trainer(cfg, run_dir=os.devnull)
    return [line for line in out.getvalue().splitlines() if "train.malloc_tuning" in line]


@pytest.mark.parametrize("on", [True, False])
def test_start_up_line_once_on_rank_0(on):
    from dist import spawn
    r0, r1 = spawn(2, _said, on)
    assert len(r0) == int(on) and r1 == []
