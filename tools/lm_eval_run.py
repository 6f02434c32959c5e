#!/usr/bin/env python
"""EleutherAI lm-eval's own command line, with megagpt's model registered (`--model megagpt`).

    python tools/lm_eval_run.py --model megagpt --model_args load=runs/tiny \\
        --tasks my_task --include_path my_tasks/ --batch_size 8 --output_path results/

lm-eval 0.4 does not discover models from other packages, so the plain `lm_eval` script cannot see
megagpt; this wrapper imports megagpt.lm_eval_model (which registers it) and runs lm-eval's CLI on the
same arguments. It runs offline: the Hugging Face hub and datasets are told so unless the environment
already says otherwise, so tasks must point at local data files (dataset_path: json, data_files: ...).
"""
from __future__ import annotations

import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

try:
    importlib.import_module("megagpt.lm_eval_model")      # registers --model megagpt
    from lm_eval.__main__ import cli_evaluate  # noqa: E402
except ImportError as e:                                   # one line, naming the extra
    sys.exit(f"error: {e}: lm-eval is the eval extra (pip install -e '.[eval]')")

if __name__ == "__main__":
    sys.exit(cli_evaluate())
