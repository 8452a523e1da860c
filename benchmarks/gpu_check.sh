#!/usr/bin/env bash
# One call on a bare GPU machine (nothing installed, no C++ extension built): checks both Triton
# kernel families and times them against cuDNN, in under 8 minutes. Every stage has its own time
# limit, all of them share one overall deadline, and a stage that cannot run fails fast; a
# summary (ok / FAIL / TIMEOUT / SKIP per stage) is printed last.
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (default $OUT; every log and results.csv go there)
#        GPU_CHECK_ONLY='pytest|tune' bash benchmarks/gpu_check.sh   (only the stages whose name
#        matches this extended regex)
#        GPU_CHECK_STRETCH=2 ...   (every stage's own limit times 2: the full CUDA suite, ~900 tests,
#        took 236 s in 12 xdist workers on an H200, more than its stage's share)
#        GPU_CHECK_SECONDS=330 ...   (the overall deadline, default 470 s)
#        GPU_CHECK_TESTS='tests/test_persistent.py ...'   (the pytest stages' files; default: all
#        that take a backend)
#        GPU_CHECK_PROVIDERS=nnrnn,fused-persistent   (the timing stages' providers; default: cuDNN
#        and both kernel families)
#        GPU_CHECK_TUNE_TILINGS=16x16x4x2x256,...   (extra tilings for the tune stage)
#
# Stages: environment; the sm_90 compile check (in the background, CPU only); the CUDA test
# suite with FUSED_RNN_TRITON_KERNEL=persistent (a persistent-kernel failure is an error there,
# not a fallback) and =blocked; the barrier stress run; the timing tables (benchmarks/bench_rnn.py,
# both cells: the course's and nn.RNN's own against cuDNN);
# determinism / no-sync / bad-id / 2^31-offset checks; compute-sanitizer memcheck on two small shapes;
# the persistent tilings timed side by side (benchmarks/tune_persistent.py), the step probe
# (benchmarks/step_probe.py) and one Nsight Compute profile of a persistent forward (each skipped
# when the deadline has passed: GPU_CHECK_ONLY=tune, =probe, =profile select them alone).
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/fused_rnn_gpu_check}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS, for the determinism tests
unset TRITON_INTERPRET
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))  # leaves room for the machine's start-up within 8 minutes
summary=()

record() {  # record NAME RC SECONDS LOG
    local status=ok
    if [ "$2" = skip ]; then status=SKIP
    elif [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then status=TIMEOUT
    elif [ "$2" -ne 0 ]; then status="FAIL(rc=$2)"; fi
    summary+=("$(printf '| %-26s | %-12s | %4s s | %s |' "$1" "$status" "$3" "$4")")
}

selected() {  # selected NAME: whether GPU_CHECK_ONLY (an extended regex; unset: all) selects the stage
    [ -z "${GPU_CHECK_ONLY:-}" ] || printf '%s' "$1" | grep -qE "$GPU_CHECK_ONLY"
}

stage() {  # stage NAME LIMIT_S LOG command...: runs with min(LIMIT_S, time left), logs to $out/LOG
    local name=$1 limit=$2 log=$3 t0=$SECONDS
    shift 3
    if ! selected "$name"; then
        echo "== $name: SKIP (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)"; record "$name" skip 0 "$log"; return
    fi
    limit=$((limit * ${GPU_CHECK_STRETCH:-1}))
    local left=$((deadline - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: SKIP (out of time)"; record "$name" skip 0 "$log"; return
    fi
    echo "== $name (limit ${limit} s)"
    timeout -k 5 "$limit" "$@" > "$out/$log" 2>&1
    local rc=$?
    tail -n 4 "$out/$log"
    record "$name" "$rc" $((SECONDS - t0)) "$log"
}

gpu_stage() {  # like stage, but fails at once without a CUDA device (pytest and the benchmark
    # would otherwise run their slow CPU paths)
    if [ "$have_gpu" -eq 0 ] && selected "$1"; then
        echo "== $1: FAIL (no CUDA device)"; echo "no CUDA device" > "$out/$3"; record "$1" 1 0 "$3"; return
    fi
    stage "$@"
}

# -- environment
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')"
} > "$out/env.log" 2>&1
env_rc=$?
cat "$out/env.log"
have_gpu=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device: the GPU stages fail fast below"
    have_gpu=0 env_rc=1
fi
record environment "$env_rc" 0 env.log

# -- compile check for sm_90, in the background (CPU only): every kernel the planner would pick
cc_t0=$SECONDS cc_pid=""
if selected "compile check sm_90"; then
timeout -k 5 300 sh -c 'python -m fused_rnn.compile_check --arch sm_90 --hidden-sizes 1,100,256,300,384,512,1000,1024 \
    --dtypes fp32,bf16,fp16 --batch-sizes 64,256 --cells course; rc=$?
    python -m fused_rnn.compile_check --arch sm_90 --hidden-sizes 100,256,512 --dtypes fp32 \
    --batch-sizes 64,256 --cells lstm,gru --families persistent || rc=1; exit $rc' > "$out/compile_check.log" 2>&1 &
    cc_pid=$!
fi

# -- the CUDA test suite, both kernel families (the cpu backend's tests ran in CI)
# (every file whose tests take a backend: their tensors go where it runs, conftest.backend_device;
# the CLI and app tests run on the CPU and ran in CI)
tests=${GPU_CHECK_TESTS:-"tests/test_parity.py tests/test_persistent.py tests/test_modules.py tests/test_properties.py
       tests/test_ecosystem.py tests/test_reference.py tests/test_self_check.py tests/test_inputs.py
       tests/test_elman.py tests/test_nn_rnn.py tests/test_edges.py tests/test_gated.py
       tests/test_triton_gated.py tests/test_gated_persistent.py tests/test_gated_modules.py
       tests/test_torch_module_db.py"}
providers=${GPU_CHECK_PROVIDERS:-nnrnn,fused-blocked,fused-persistent}
# Where pytest-xdist is installed the suite runs in parallel workers (the cost is mostly Triton
# compiling each kernel configuration on the CPU; the GPU time-slices between the workers'
# contexts, so a persistent kernel still has all its programs resident); where pytest-timeout is,
# a test past 120 s fails with its stack (under xdist faulthandler's dump would go to a worker).
parallel=""
python -c "import xdist" 2>/dev/null && parallel="-n ${GPU_CHECK_WORKERS:-12}"
python -c "import pytest_timeout" 2>/dev/null && parallel="$parallel --timeout=120"
# (the first stage pays the cold Triton cache: ~1-3 s per kernel configuration; -v and
# --maxfail: every verdict reaches the log, and one failure does not hide the rest; a test past
# faulthandler_timeout dumps every thread's stack to the log, so a hang shows where it waits:
# the first GPU run's was cut inside one test with no trace)
FUSED_RNN_TRITON_KERNEL=persistent gpu_stage "pytest persistent" 150 pytest_persistent.log \
    python -m pytest -v --maxfail=20 -p no:cacheprovider -o faulthandler_timeout=60 $parallel --tier all -k "not cpu and not extension" --durations=10 \
    -W "error::fused_rnn.ops.triton_rnn.PersistentKernelWarning" $tests

stage "barrier stress" 60 stress_barrier.log \
    python benchmarks/stress_barrier.py --launches 400 --seconds 45

# -- timings: cuDNN (nnrnn) against both kernel families; the course loop at one shape only
# (about 100 ms a call at T=512)
shapes="512,8,256;64,512,256;256,512,256;1024,512,256;256,512,512;256,512,1024"
gpu_stage "bench" 150 bench.log \
    python benchmarks/bench_rnn.py --shapes "$shapes" --providers $providers \
    --modes fwd,fwd+bwd --dtypes fp32,bf16 --csv "$out/results.csv" --plot "$out/speedup.png"
# nn.RNN's own cell against cuDNN's nn.RNN (the same stage, --cell elman)
elman_shapes="512,8,64,256;64,512,256,256;256,512,256,256;256,512,512,512"
gpu_stage "bench elman" 90 bench_elman.log \
    python benchmarks/bench_rnn.py --cell elman --shapes "$elman_shapes" \
    --providers $providers --modes fwd,fwd+bwd --dtypes fp32,bf16 \
    --csv "$out/results.csv" --plot "$out/speedup_elman.png"
# the LSTM and GRU against cuDNN's nn.LSTM / nn.GRU, each Triton family: H=256 in fp32 and bf16,
# H=512 in bf16 (issue 30's shapes; the fp32 H=512 blocked kernels took 0.6-0.8 s a call on the
# first GPU run, and the stage timed out)
for cell in lstm gru; do
    gpu_stage "bench $cell" 60 "bench_$cell.log" sh -c "
        python benchmarks/bench_rnn.py --cell $cell --shapes '64,512,256,256;256,512,256,256' \
            --providers $providers --modes fwd,fwd+bwd --dtypes fp32,bf16 \
            --csv '$out/results.csv' --plot '' &&
        python benchmarks/bench_rnn.py --cell $cell --shapes '256,512,512,512' \
            --providers $providers --modes fwd,fwd+bwd --dtypes bf16 \
            --csv '$out/results.csv' --plot '$out/speedup_$cell.png'"
done
# the course's own loop at issue 30's T=512 (the target: >= 40x it; ~0.1 s a fwd+bwd call)
gpu_stage "bench loop" 40 bench_loop.log \
    python benchmarks/bench_rnn.py --shapes "64,512,256" --providers loop,nnrnn,fused-persistent \
    --modes fwd,fwd+bwd --dtypes fp32 --csv "$out/results.csv" --plot ""

stage "extra checks" 60 extra_checks.log python benchmarks/gpu_extra_checks.py

FUSED_RNN_TRITON_KERNEL=blocked gpu_stage "pytest blocked" 90 pytest_blocked.log \
    python -m pytest -v --maxfail=20 -p no:cacheprovider -o faulthandler_timeout=60 $parallel --tier all -k "not cpu and not extension" --durations=10 tests/test_parity.py tests/test_modules.py

# -- compute-sanitizer memcheck on two small shapes, both kernel families
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$sanitizer" ]; then
    cat > "$out/sanitizer_case.py" <<'EOF'
import os, torch
from fused_rnn import fused_rnn
for kernel in ("blocked", "persistent"):
    os.environ["FUSED_RNN_TRITON_KERNEL"] = kernel
    for B, T, H in ((5, 7, 100), (33, 3, 300)):
        g = torch.Generator(device="cuda").manual_seed(0)
        w_in = torch.randn(H, 8, device="cuda", generator=g, requires_grad=True)
        w_h = (torch.randn(H, H, device="cuda", generator=g) / H ** 0.5).requires_grad_()
        emb = torch.randn(11, 8, device="cuda", generator=g, requires_grad=True)
        x = torch.randint(0, 11, (B, T), device="cuda", generator=g)
        out, h_n = fused_rnn(x, w_in, None, w_h, None, embedding=emb)
        (out.sum() + h_n.sum()).backward()
        torch.cuda.synchronize()
        print(kernel, B, T, H, "ok")
EOF
    echo "compute-sanitizer: $sanitizer"
    gpu_stage "compute-sanitizer" 45 sanitizer.log \
        "$sanitizer" --tool memcheck --error-exitcode 1 python "$out/sanitizer_case.py"
else
    echo "compute-sanitizer: not on PATH nor under /usr/local/cuda*/bin: memcheck skipped" | tee "$out/sanitizer.log"
    record "compute-sanitizer" skip 0 "sanitizer.log (not found)"
fi

# -- tuning (issue 30): every persistent tiling of the planner's tables against the blocked kernels
# and cuDNN at the tuning shapes (GPU_CHECK_ONLY=tune GPU_CHECK_STRETCH=3 for more time), and one Nsight
# Compute profile of the course cell's persistent forward at H=256 (where its step's time goes:
# stall reasons, issue slots; GPU_CHECK_ONLY=profile)
gpu_stage "tune" 120 tune.log \
    python benchmarks/tune_persistent.py --cells course,elman,lstm,gru --shapes "64,512,256;256,512,256" \
    --tilings "${GPU_CHECK_TUNE_TILINGS:-}"
# the step's pieces (benchmarks/step_probe.py): the loads, store and barrier alone; the kernels'
# chunked product; with an input after the product loaded after it or in the wait before the step
gpu_stage "step probe" 60 step_probe.log \
    python benchmarks/step_probe.py --shapes "64,512,256;256,512,256" \
    --variants none-4-16,split-ieee-8-4-16,split-ieee-8-4-16+q,split-ieee-8-4-16+qwait
ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
if [ -n "$ncu_bin" ]; then
    gpu_stage "ncu profile" 60 ncu_profile.log \
        "$ncu_bin" --kernel-name regex:rnn_persistent_fwd --launch-skip 5 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
        python benchmarks/tune_persistent.py --cells course --shapes "64,64,256" --modes fwd
else
    echo "ncu: not on PATH nor under /usr/local/cuda*/bin: profile skipped" | tee "$out/ncu_profile.log"
    record "ncu profile" skip 0 "ncu_profile.log (not found)"
fi

# -- the compile check's result (its own 300 s limit ends within the overall deadline)
if [ -n "$cc_pid" ]; then
    wait "$cc_pid"; cc_rc=$?
    tail -n 3 "$out/compile_check.log"
    record "compile check sm_90" "$cc_rc" $((SECONDS - cc_t0)) compile_check.log
else
    record "compile check sm_90" skip 0 compile_check.log
fi

echo
grep -h "^|" "$out/bench.log" "$out/bench_elman.log" "$out/bench_loop.log" 2>/dev/null | tail -n 60
echo
grep -hE "(FAILED|ERROR)" "$out/pytest_persistent.log" "$out/pytest_blocked.log" 2>/dev/null | grep "::" | head -n 40
echo "pytest, tests passed: $(cat "$out"/pytest_*.log 2>/dev/null | grep -c " PASSED")"
echo
echo "| stage | status | time | log (under $out) |"
echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
