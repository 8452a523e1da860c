"""The compile check: every kernel configuration the planner picks compiles for sm_90 and sm_80
without a GPU, without spills where the planner counts on none, and at the co-residency it
assumes; and the check fails when those numbers say otherwise."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
from fused_rnn import compile_check  # noqa: E402
from conftest import tiered  # noqa: E402


def run_cli(*args):
    # The interpreter's kernels cannot be compiled: run without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "fused_rnn.compile_check", *args], env=env,
                          capture_output=True, text=True, timeout=900)


FAST_COMPILES = ("--arch", "sm_90", "--hidden-sizes", "100", "--dtypes", "fp32", "--batch-sizes", "64",
                 "--cells", "course,elman_tanh")


# The fast tier compiles each cell's persistent kernels once at an unaligned H (5 compiles); the
# exhaustive spread costs ~35 more: H = 1 (a constant), a 512 tiling, H = 1024 at a batch it fits,
# half types, sm_80's smaller shared memory, and nn.RNN's own cells.
@pytest.mark.parametrize("args", tiered([
    FAST_COMPILES,
    ("--arch", "sm_90", "--hidden-sizes", "1,512", "--dtypes", "fp32", "--batch-sizes", "256", "--cells", "course"),
    ("--arch", "sm_90", "--hidden-sizes", "100,1024", "--dtypes", "bf16", "--batch-sizes", "64", "--cells", "course"),
    ("--arch", "sm_80", "--hidden-sizes", "256", "--dtypes", "fp16", "--batch-sizes", "256", "--cells", "course"),
    ("--arch", "sm_90", "--hidden-sizes", "100,512", "--dtypes", "fp32", "--batch-sizes", "256",
     "--cells", "elman_tanh,elman_relu"),
    ("--arch", "sm_80", "--hidden-sizes", "256", "--dtypes", "bf16", "--batch-sizes", "64", "--cells", "elman_relu"),
], fast={FAST_COMPILES}), ids=["sm90-fp32-H100", "sm90-fp32", "sm90-bf16", "sm80-fp16", "sm90-fp32-elman", "sm80-bf16-elman-relu"])
def test_planned_kernels_compile(args):
    run = run_cli(*args)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| persistent")]
    n_hidden = len(args[3].split(","))
    # per H: the course's fwd (token and dense input) and bwd; an elman cell's fwd (dense) and bwd
    per_hidden = sum(3 if cell == "course" else 2 for cell in args[args.index("--cells") + 1].split(","))
    assert len(rows) == per_hidden * n_hidden, run.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[6]) == 0, row  # spill bytes


@pytest.mark.exhaustive
def test_cli_refuses_the_interpreter_and_bad_arguments():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "fused_rnn.compile_check"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "TRITON_INTERPRET" in run.stderr
    run = run_cli("--dtypes", "fp8")
    assert run.returncode != 0 and "fp8" in run.stderr


def _fake_config(planned_per_sm):
    return compile_check.KernelConfig("persistent_fwd", "fp32", 256, 256, "16x16", fn=None,
                                      num_warps=4, planned_programs_per_sm=planned_per_sm)


@pytest.mark.parametrize("result,planned,failure", [
    (dict(registers=136, spill_bytes=0, shared_bytes=32768, release_acquire=True), 3, None),
    (dict(registers=184, spill_bytes=0, shared_bytes=32768, release_acquire=True), 3, "2 programs fit per SM"),
    (dict(registers=255, spill_bytes=64, shared_bytes=32768, release_acquire=True), 2, "spills 64 bytes"),
    (dict(registers=64, spill_bytes=0, shared_bytes=300000, release_acquire=True), 1, "shared memory"),
    (dict(registers=136, spill_bytes=0, shared_bytes=32768, release_acquire=False), 3, "release arrival"),
    (RuntimeError("out of resource: shared memory"), 1, "compile failed"),
], ids=["ok", "co-residency", "spills", "shared", "relaxed-barrier", "compile-error"])
def test_check_fails_on_what_breaks_the_plan(monkeypatch, result, planned, failure):
    def fake_compile(cfg, arch):
        if isinstance(result, Exception):
            raise result
        return result
    monkeypatch.setattr(compile_check, "compile_config", fake_compile)
    monkeypatch.setattr(compile_check.KernelConfig, "key", lambda self: id(self))
    out = io.StringIO()
    failures = compile_check.check([_fake_config(planned)], 90, out=out)
    assert "| persistent_fwd | fp32 | 256 | 256 |" in out.getvalue()
    if failure is None:
        assert failures == []
    else:
        assert failures and any(failure in f for f in failures), failures


def test_blocked_kernel_spills_are_reported_not_failed(monkeypatch):
    monkeypatch.setattr(compile_check, "compile_config",
                        lambda cfg, arch: {"registers": 255, "spill_bytes": 456, "shared_bytes": 61440,
                                           "release_acquire": False})
    monkeypatch.setattr(compile_check.KernelConfig, "key", lambda self: id(self))
    cfg = compile_check.KernelConfig("blocked_bwd", "fp32", 256, 256, "16x64x64", fn=None)
    assert compile_check.check([cfg], 90, out=io.StringIO()) == []


def test_configs_follow_the_planner():
    configs, notes = compile_check.kernel_configs(256, 1024, torch.float32, 132)
    # the course's blocked forward for token and dense input, each with and without its bias
    assert [c.kernel for c in configs] == ["blocked_fwd", "blocked_fwd_nobias", "blocked_fwd_dense",
                                           "blocked_fwd_dense_nobias", "blocked_bwd"] and "does not fit" in notes[0]
    assert [(c.constexprs["TOKENS"], c.constexprs["HAS_BIAS"]) for c in configs[:4]] == [
        (True, True), (True, False), (False, True), (False, False)]
    configs, notes = compile_check.kernel_configs(64, 1024, torch.bfloat16, 132)
    assert [c.kernel for c in configs][:3] == ["persistent_fwd", "persistent_fwd_dense", "persistent_bwd"]
    assert configs[0].planned_programs_per_sm == 1 and not notes


def test_elman_configs_read_dense_q_without_bias():
    configs, _ = compile_check.kernel_configs(256, 256, torch.float32, 132, cell="elman_relu")
    assert [c.kernel for c in configs] == ["persistent_fwd_dense[elman_relu]", "persistent_bwd[elman_relu]",
                                           "blocked_fwd_dense[elman_relu]", "blocked_bwd[elman_relu]"]
    for c in configs:
        assert c.constexprs["CELL"] == "elman_relu" and not c.constexprs.get("TOKENS")
        assert not c.constexprs.get("HAS_BIAS")


def test_configs_that_compile_differently_have_different_keys():
    """H reaches the compiler through its specialization: H=100 (rows not 16-aligned) must not
    reuse H=256's compile, nor H=1 (a constant)."""
    def blocked(H):
        return compile_check.kernel_configs(256, H, torch.float32, 132)[0][-1]
    assert blocked(256).key() == blocked(512).key()
    assert len({blocked(1).key(), blocked(100).key(), blocked(256).key()}) == 3


def test_gated_configs_follow_the_planner():
    """The LSTM's persistent kernels where the planner plans them (with and without a gradient at
    c_t), then the blocked ones (and their projection); a note where the plan does not fit."""
    from fused_rnn.ops import planner

    configs, notes = compile_check.gated_kernel_configs(64, 256, torch.float32, "lstm", 90, 132)
    plan = planner.plan_persistent(64, 256, torch.float32, 132, gates=4)
    assert [c.kernel for c in configs][:3] == ["persistent_fwd[lstm]", "persistent_bwd_grad_cs[lstm]",
                                               "persistent_bwd[lstm]"] and not notes
    for c in configs[:3]:
        assert c.family == "persistent" and c.planned_programs_per_sm == plan.programs_per_sm
        assert (c.constexprs["BLOCK_N"], c.num_warps, c.num_stages) == (plan.block_n, plan.num_warps, 1)
    assert all(c.family == "blocked" for c in configs[3:]) and any("_proj" in c.kernel for c in configs)
    configs, notes = compile_check.gated_kernel_configs(4096, 512, torch.bfloat16, "gru", 80, 108)
    assert not any(c.family == "persistent" for c in configs) and "does not fit" in notes[0]


# The gated cells' persistent kernels at the planner's tilings: every table row (H_PAD 64 to 512,
# aligned and odd H, 16x16 and 16x32 blocks through B) on both targets, half types included.
GATED_COMPILES = [
    ("--arch", "sm_90", "--hidden-sizes", "50,128,200,512", "--dtypes", "fp32", "--batch-sizes", "64,1024"),
    ("--arch", "sm_90", "--hidden-sizes", "100,256", "--dtypes", "bf16", "--batch-sizes", "64"),
    ("--arch", "sm_80", "--hidden-sizes", "64,100,256,300", "--dtypes", "fp16", "--batch-sizes", "64,1024"),
]


@pytest.mark.exhaustive
@pytest.mark.parametrize("args", GATED_COMPILES, ids=["sm90-fp32", "sm90-bf16", "sm80-fp16"])
def test_gated_persistent_kernels_compile(args):
    run = run_cli(*args, "--cells", "lstm,gru", "--families", "persistent")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| persistent")]
    assert {row[0].split("[")[1] for row in rows} == {"lstm]", "gru]"}, run.stdout
    assert all(int(row[6]) == 0 for row in rows), run.stdout


@pytest.mark.exhaustive
def test_a_relaxed_barrier_fails_the_compile_check(tmp_path):
    """The barrier with relaxed atomics passes every interpreter test (tests/test_gated_barrier.py);
    the check must see it in the PTX."""
    tests = Path(__file__).parent
    script = f"""
import sys, torch
sys.path.insert(0, {str(tests)!r})
from kernel_mutants import relaxed_barrier
from fused_rnn import compile_check
from fused_rnn.ops import triton_gated_persistent
# patched before the kernel is first compiled (its cache key covers the functions it calls then)
triton_gated_persistent._group_barrier = relaxed_barrier({str(tmp_path)!r})
configs, _ = compile_check.gated_kernel_configs(64, 64, torch.float32, "gru", 90, 132)
print("FAILURES:", compile_check.check([c for c in configs if c.family == "persistent"][:1], 90))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "lacks a release arrival or an acquire read" in run.stdout.split("FAILURES:")[1], run.stdout
