"""glibc's malloc thresholds for CPU training (train.malloc_tuning).

By default glibc serves blocks above a (dynamic, at most 32 MiB) threshold with their own mmap and
unmaps them on free, and returns the top of the heap to the OS above a trim threshold. A training
step frees and reallocates the same activation and gradient tensors every microbatch (the [s, b, V]
logits alone are 16 MiB at the issue-18 shape), so each new one page-faults its memory in again and
the kernel zeroes every page. Raising both thresholds keeps the freed blocks in the process for reuse:
mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 1 GiB). Process-wide, set once per
rank at start-up (forked ranks would inherit a parent's setting too); Linux/glibc and CPU devices only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's malloc.h
MMAP_THRESHOLD = 32 * 2 ** 20                    # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2 ** 30


def tune_malloc(device_type: str) -> str:
    """Set the thresholds where they apply; returns the one line that says what was done."""
    if device_type != "cpu":
        return f"train.malloc_tuning: not applied on {device_type} (CPU runs only)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "train.malloc_tuning: not applied (needs Linux with glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        return "train.malloc_tuning: glibc refused mallopt; its defaults stay"
    return (f"train.malloc_tuning: glibc malloc keeps freed blocks up to {MMAP_THRESHOLD >> 20} MiB for reuse "
            f"(mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 30} GiB; "
            f"train.malloc_tuning: false for glibc's defaults)")
