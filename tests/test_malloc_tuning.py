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
