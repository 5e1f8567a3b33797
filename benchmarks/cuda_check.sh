#!/usr/bin/env bash
# The CUDA checks of the engine, in one run on a machine with a GPU (CI has none):
#   1. the CUDA tests (tests/core/test_cuda.py and the CUDA cases of test_activations.py and test_fused_cpila.py);
#   2. benchmarks/gpu_step.py (precision, G's products with CPila plain and fused and the series' two kinds of
#      products, training steps of MNIST- and CIFAR-10-shaped models, digits and the 2-D toy on CUDA). Its JSON is
#      rewritten after every measurement, so its time limit (GPU_STEP_TIMEOUT seconds, default 360) still leaves
#      everything measured before it in $OUT/gpu_step.json;
#   3. the whole core suite with CUDA visible (nothing else may break when a GPU is there). It comes last: on a
#      short device lease the benchmark's figures matter most, and the suite passed with CUDA visible before.
# Usage: bash benchmarks/cuda_check.sh OUT_DIR [--tiny]   (from the repository root; PYTHON defaults to python3)
#   --tiny checks this script on a machine without a GPU: the CUDA tests (they skip), gpu_step.py --tiny on the
#   CPU (smoke figures, labelled so in its JSON), and no core suite (CI runs it).
set -u
out=${1:?usage: cuda_check.sh OUT_DIR [--tiny]}
tiny=${2:-}
if [ -n "$tiny" ] && [ "$tiny" != "--tiny" ]; then
  echo "cuda_check.sh: unknown option $tiny (only --tiny)" >&2
  exit 2
fi
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/cuda_check.log"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 QT_QPA_PLATFORM=offscreen
status=0
{ nvidia-smi -L 2>&1 || echo "no nvidia-smi"; "$py" -c 'import sys, torch; print("python", sys.version.split()[0],
  "torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")'; } 2>&1 | tee "$log"
echo "== 1. CUDA tests" | tee -a "$log"
"$py" -m pytest -q -p no:cacheprovider -rs tests/core/test_cuda.py tests/core/test_activations.py \
  tests/core/test_fused_cpila.py 2>&1 | tee -a "$log"
status=$((status | PIPESTATUS[0]))
echo "== 2. image flows on the GPU (benchmarks/gpu_step.py)" | tee -a "$log"
if [ -n "$tiny" ]; then
  gpu_step_args=(--tiny --device cpu)
else
  gpu_step_args=()
fi
timeout "${GPU_STEP_TIMEOUT:-360}" "$py" benchmarks/gpu_step.py "${gpu_step_args[@]}" --out "$out/gpu_step.json" 2>&1 \
  | tee -a "$log"
status=$((status | PIPESTATUS[0]))
if [ -n "$tiny" ]; then
  echo "== 3. core suite: skipped with --tiny (CI runs it without a GPU)" | tee -a "$log"
else
  echo "== 3. core suite with CUDA visible" | tee -a "$log"
  xdist=$("$py" -c 'import xdist' 2>/dev/null && echo "-n 8")
  "$py" -m pytest -q -p no:cacheprovider $xdist tests/core 2>&1 | tail -15 | tee -a "$log"
  status=$((status | PIPESTATUS[0]))
fi
echo "== exit status $status" | tee -a "$log"
exit $status
