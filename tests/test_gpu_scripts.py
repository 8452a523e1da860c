"""The GPU check's scripts run without a GPU too, so that they cannot rot between the rare
sessions lent one (the first GPU run found gpu_extra_checks.py calling a kernel launcher with an
old signature)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_extra_checks_dry_run_on_the_cpu():
    done = subprocess.run([sys.executable, "benchmarks/gpu_extra_checks.py", "--cpu-dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run: 0 failures" in done.stdout


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_tune_persistent_dry_run_on_the_cpu():
    done = subprocess.run([sys.executable, "benchmarks/tune_persistent.py", "--cpu-dry-run",
                           "--tilings", "16x16x4x1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "dry run: done"
    # the table's two tilings for the course cell at H=256 on 132 SMs, then the extra one (its 4 x 16
    # programs at B=64 fit at 1 per SM; its 16 x 16 at B=256 do not)
    course = [line for line in lines if line.startswith("| course | 64 | 512 | 256 | fwd |")]
    assert [line.split(" | ")[5:8] for line in course] == [["16x16 4w K/8", "4x16", "2"], ["16x32 4w K/8", "4x8", "2"],
                                                            ["16x16 4w K/8", "4x16", "1"]]
    assert any("not planned" in line for line in lines if line.startswith("| course | 256 | 512 | 256 |"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the selected stages would run for minutes")
def test_gpu_check_runs_only_the_selected_stages(tmp_path):
    # GPU_CHECK_ONLY is an extended regex over the stage names; without a GPU the selected GPU
    # stages fail at once and every other stage is skipped
    env = dict(os.environ, GPU_CHECK_ONLY="tune|bench gru")
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| stage")}
    assert rows["tune"].startswith("FAIL") and rows["bench gru"].startswith("FAIL"), done.stdout[-3000:]
    assert all(status == "SKIP" for name, status in rows.items()
               if name not in ("tune", "bench gru", "environment")), rows


def test_a_forced_kernel_family_holds_over_the_backward(monkeypatch):
    # bench_rnn's fused-blocked / fused-persistent: the backward runs after the provider returns,
    # and must run on the same family as the forward
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_rnn
    monkeypatch.delenv("FUSED_RNN_TRITON_KERNEL", raising=False)
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            seen.append(("fwd", os.environ.get("FUSED_RNN_TRITON_KERNEL")))
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            seen.append(("bwd", os.environ.get("FUSED_RNN_TRITON_KERNEL")))
            return grad * 2

    w = torch.ones(3, requires_grad=True)
    fn = bench_rnn.forced("persistent", lambda x: (Spy.apply(w * x), (w * x).sum(0, keepdim=True)))
    for mode in ("fwd", "fwd+bwd"):
        bench_rnn.make_step(fn, [w], torch.ones(2, 3), mode)()
    assert seen == [("fwd", "persistent"), ("fwd", "persistent"), ("bwd", "persistent")]
    assert "FUSED_RNN_TRITON_KERNEL" not in os.environ


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the probe's kernel in the interpreter")
@pytest.mark.parametrize("variant", ["dot-ieee-4-16+q", "dot-ieee-4-16+qwait", "split-ieee-2-4-16+qwait"])
def test_step_probe_steps_match_the_reference(variant):
    # one column block (H = BLOCK_N), so the programs need no barrier: every step is checked
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_probe
    B, T, H = 20, 4, 16
    g = torch.Generator().manual_seed(0)
    w, h0, q = torch.randn(H, H, generator=g) / H ** 0.5, torch.randn(B, H, generator=g), torch.randn(B, T, H, generator=g)
    h = torch.zeros(B, T + 1, H)
    h[:, 0] = h0
    step_probe.launch(variant, h, w, q, torch.zeros(2 * T, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), T, False)
    ref = h0.double()
    for t in range(T):
        ref = torch.tanh(ref @ w.double().T + q[:, t].double())
        torch.testing.assert_close(h[:, t + 1].double(), ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        step_probe.parse("rows-4-16+q")
