#!/usr/bin/env bash
# The CUDA checks of the engine, in one run on a machine with a GPU (CI has none):
#   1. the CUDA tests (tests/core/test_cuda.py, the CUDA case of test_activations.py);
#   2. the whole core suite with CUDA visible (nothing else may break when a GPU is there);
#   3. benchmarks/gpu_step.py (precision, G's products, training steps of MNIST- and CIFAR-10-shaped models,
#      digits and the 2-D toy on CUDA); its JSON is rewritten after every measurement, so the time limit below
#      still leaves everything measured before it in $OUT/gpu_step.json.
# Usage: bash benchmarks/cuda_check.sh OUT_DIR   (run from the repository root; uses `python3` and PYTHONPATH=.)
set -u
out=${1:?usage: cuda_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 QT_QPA_PLATFORM=offscreen
status=0
{ nvidia-smi -L; python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
  "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")'; } \
  2>&1 | tee "$out/cuda_check.log"
echo "== 1. CUDA tests" | tee -a "$out/cuda_check.log"
python3 -m pytest -q -p no:cacheprovider -rs tests/core/test_cuda.py tests/core/test_activations.py 2>&1 \
  | tee -a "$out/cuda_check.log"
status=$((status | PIPESTATUS[0]))
echo "== 2. core suite with CUDA visible" | tee -a "$out/cuda_check.log"
xdist=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")
python3 -m pytest -q -p no:cacheprovider $xdist tests/core 2>&1 | tail -15 | tee -a "$out/cuda_check.log"
status=$((status | PIPESTATUS[0]))
echo "== 3. image flows on the GPU" | tee -a "$out/cuda_check.log"
timeout 420 python3 benchmarks/gpu_step.py --out "$out/gpu_step.json" 2>&1 \
  | tee -a "$out/cuda_check.log"
status=$((status | PIPESTATUS[0]))
echo "== exit status $status" | tee -a "$out/cuda_check.log"
exit $status
