import os
import sys

import torch

# Forked ranks must start from a one-thread parent (a child forked from a 2-thread parent hangs in matmul).
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))

# Imported once here rather than in every forked rank: the loss plot, the training log and autograd's
# first backward (about 2.5 s of CPU per forked Trainer otherwise). Optional: the suite runs without them.
for _module in ("matplotlib.pyplot", "torch.utils.tensorboard", "torch.fx.experimental.symbolic_shapes"):
    try:
        __import__(_module)
    except ImportError:
        pass


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_process_group_leaks():
    """A test that leaves torch.distributed initialized in the pytest process would make every later
    forked rank fail ("initialize the default process group twice"): fail that test instead, here."""
    yield
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group initialized in the pytest process")
