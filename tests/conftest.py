import os
import sys

import torch

# Forked ranks must start from a one-thread parent (a child forked from a 2-thread parent hangs in matmul).
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
