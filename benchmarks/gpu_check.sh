#!/usr/bin/env bash
# One call on a GPU machine: the test suite natively on CUDA, then fused vs eager vs cuDNN
# timings at the design shapes. Each stage has its own time limit so one hang cannot eat the rest.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]    (writes logs and results.csv there too)
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/fused_rnn_gpu_check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

# The Triton suite natively (the cpu-backend tests ran in CI already; skipping them here saves
# building the C++ extension on the GPU machine).
timeout 300 python -m pytest -q -x -p no:cacheprovider tests/test_parity.py tests/test_modules.py \
    tests/test_reference.py -k "not cpu" 2>&1 | tee "$out/pytest.log" | tail -5
echo "pytest exit: ${PIPESTATUS[0]}"

timeout 240 python benchmarks/bench_rnn.py --shapes design --providers eager,cudnn,fused \
    --modes fwd,fwd+bwd --dtypes fp32 --plot "$out/speedup_fp32.png" > "$out/bench_fp32.log" 2>&1
echo "bench fp32 exit: $?"
timeout 90 python benchmarks/bench_rnn.py --shapes "256,512,256" --providers cudnn,fused \
    --modes fwd --dtypes bf16 --plot "" > "$out/bench_bf16.log" 2>&1
echo "bench bf16 exit: $?"
cp benchmarks/results.csv "$out/" 2>/dev/null
echo; grep -h "^|" "$out"/bench_*.log
