#!/usr/bin/env bash
# For a machine with one CUDA GPU and no network (`make gpu-bench`); about 3-5 minutes, under 8.
#   1. the suite's CUDA tests on the GPU (tests/test_cuda.py): NCCL init + TP=1 fwd/bwd, a finite bf16
#      step, flash/SDPA attention against the math;
#   2. tools/gpu_bench.py: a bf16 training step of a ~1B megagpt model at seq 4096 against transformers'
#      LlamaForCausalLM on the same GPU: tokens/s, TFLOP/s, MFU, peak memory; one table + JSON.
# Extra arguments go to gpu_bench.py (e.g. --recompute full, --peak-tflops 700).
# Every stage has its own time limit, so a hang cannot take the whole slot.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "(nvidia-smi unavailable)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

echo "== CUDA tests (tests/test_cuda.py)"
timeout 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
tests_rc=$?

echo "== bf16 training step, ~1B params, seq 4096"
timeout 300 "$PY" tools/gpu_bench.py "$@"
bench_rc=$?

echo "== exit codes: tests $tests_rc, bench $bench_rc (124 = timed out)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
