"""CPU clock probe for picotron's ranks (bench/vs_picotron.py puts this folder on their PYTHONPATH).

Python imports `sitecustomize` at start-up. With VS_PICOTRON_PROBE set, torch.optim.AdamW.step (picotron's
optimizer, called once per training step) is wrapped to print, after each call, the process CPU seconds
(all threads), the main thread's CPU seconds and the wall clock, so the runner can take each step's CPU time
the same way it does for megagpt (time.process_time / time.thread_time around train_step). Nothing that
picotron computes is changed.
"""
import os

if os.environ.get("VS_PICOTRON_PROBE"):
    import sys
    import time

    import torch.optim

    _step = torch.optim.AdamW.step

    def _probed_step(self, *args, **kwargs):
        out = _step(self, *args, **kwargs)
        sys.stdout.write(f"VS_PICOTRON_PROBE {time.process_time():.6f} {time.thread_time():.6f} "
                         f"{time.perf_counter():.6f}\n")
        sys.stdout.flush()
        return out

    torch.optim.AdamW.step = _probed_step
