"""The LSTM's and GRU's persistent split-H kernels (fused_rnn/ops/triton_gated_persistent.py):
their plans, their selection in `triton_gated.gated_fwd` / `gated_bwd`, and, without a GPU, their
stepwise mode (one launch per step, the launch boundary standing in for the group barrier)
against the float64 reference loop, every output and gradient, on several groups and column
blocks, odd B and H, T = 1; the fallbacks: proj_size and plans that do not fit run the blocked
kernels, a barrier that times out reruns the call on them, a wrong kernel fails its first-use
self-check. The barrier itself, run concurrently, is tests/test_gated_barrier.py's.
"""
import warnings

import pytest
import torch

from fused_rnn import cells
from fused_rnn.gated_op import gated_recurrence
from fused_rnn.ops import loop, planner
from conftest import TRITON_DEVICE as DEVICE, requires_cuda, tiered
from helpers import GATED_NAMES, TOLERANCE, compare_gated, count_persistent_launches, gated_problem, rel_err

triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
from fused_rnn.ops import triton_gated, triton_gated_persistent, triton_persistent  # noqa: E402

INTERPRET = triton_rnn.INTERPRET
stepwise_only = pytest.mark.skipif(not INTERPRET, reason="stepwise mode is the interpreter's")
GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def persistent(monkeypatch):
    """Selects the persistent kernels and counts the gated ones' launches: {"fwd": n, "bwd": n}."""
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    triton_rnn.reset_persistent_state()
    yield count_persistent_launches(monkeypatch, gated=True)
    triton_rnn.reset_persistent_state()


def problem(cell, T, B, H, **kwargs):
    return gated_problem(cell, T, B, H, device=DEVICE, **kwargs)


def tolerance(dtype):
    return 1e-12 if dtype == torch.float64 else 2 * TOLERANCE[torch.float32]


# ----------------------------------------------------------------------------------------------
# The planner


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("cell", cells.GATED, ids=str)
def test_plans_are_resident_and_fit_shared_memory(cell, dtype):
    """Every gated plan's grid fits the SMs at the co-residency it assumes, its W_hh slices fit
    the shared memory, and a grid too large for every tiling is refused, not planned."""
    for arch, sm_count in ((80, 108), (90, 1), (90, 8), (90, 132)):
        for B in (1, 17, 64, 256, 1000):
            for H in (1, 16, 50, 100, 256, 300, 512, 1024):
                plan = planner.plan_persistent(B, H, dtype, sm_count, arch=arch, gates=cell.gates)
                if not plan.fits:
                    assert plan.reason
                    continue
                assert plan.groups * plan.col_blocks <= sm_count * plan.programs_per_sm
                shared = planner.shared_bytes(plan.block_b, plan.block_n, plan.h_pad, cell.gates)
                assert shared <= planner.SHARED_PER_BLOCK[arch]
                assert plan.programs_per_sm <= planner.programs_per_sm(0, shared, plan.num_warps, arch)
                assert plan.groups * plan.block_b >= B and plan.col_blocks * plan.block_n >= H
    assert not planner.plan_persistent(4096, 512, dtype, 132, gates=cell.gates).fits


@pytest.mark.parametrize("cell", cells.GATED, ids=str)
def test_planner_refusals_say_why(cell):
    G = cell.gates
    assert "proj_size" in planner.plan_persistent(64, 256, torch.float32, 132, gates=G, projection=True).reason
    assert "proj_size" in planner.plan_persistent(64, 256, torch.float32, None, gates=G, projection=True,
                                                  stepwise=True).reason
    assert "float64" in planner.plan_persistent(64, 256, torch.float64, 132, gates=G).reason
    assert "allow_tf32" in planner.plan_persistent(64, 256, torch.float32, 132, gates=G, allow_tf32=True).reason
    assert "on chip" in planner.plan_persistent(64, 1024, torch.float32, 132, gates=G).reason
    assert planner.plan_persistent(64, 256, torch.float32, 132, gates=G).fits
    with pytest.raises(ValueError, match="gates"):
        planner.plan_persistent(64, 256, torch.float32, 132, gates=2)


def test_planner_stepwise_uses_small_tiles_for_every_dtype():
    plan = planner.plan_persistent(33, 40, torch.float64, None, stepwise=True, gates=4)
    assert plan.fits and plan.grid == (3, 3) and plan.programs_per_sm == 0


# ----------------------------------------------------------------------------------------------
# Stepwise mode against the reference loop

# (cell, T, B, H, state, bias, grad_cs, dtype): 3 groups x 3 column blocks (the last ragged);
# T = 1 with odd B and H in 1 x 2; no initial state, no bias; fp64 where gradcheck-exact.
CASES = [
    (cells.LSTM, 3, 33, 40, "both", True, True, torch.float32),
    (cells.GRU, 3, 33, 40, "both", True, False, torch.float32),
    (cells.LSTM, 1, 5, 17, "none", True, False, torch.float32),
    (cells.GRU, 1, 5, 17, "none", False, False, torch.float32),
    (cells.LSTM, 2, 20, 33, "c0", True, True, torch.float64),
    (cells.GRU, 2, 20, 33, "h0", False, False, torch.float64),
    (cells.LSTM, 2, 1, 1, "h0", True, True, torch.float32),
    (cells.GRU, 4, 17, 20, "both", True, False, torch.float64),
]


def case_id(c):
    cell, T, B, H, state, bias, grad_cs, dtype = c
    return (f"{cell.name}-T{T}-B{B}-H{H}-{state}" + ("-bias" if bias and cell.hidden_bias else "")
            + ("-grad_cs" if grad_cs else "") + ("-fp64" if dtype == torch.float64 else "-fp32"))


@stepwise_only
@pytest.mark.parametrize("case", tiered(CASES, fast=CASES[:2] + CASES[4:6], ids=case_id))
def test_stepwise_matches_the_loop(case, persistent):
    cell, T, B, H, state, bias, grad_cs, dtype = case
    args = problem(cell, T, B, H, state=state, bias=bias, dtype=dtype, seed=T * B + H)
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        compare_gated(cell, args, grad_cs, tol=tolerance(dtype))
    assert persistent == {"fwd": 1, "bwd": 1}  # the persistent kernels ran, not the blocked ones


@stepwise_only
@pytest.mark.parametrize("cell", tiered(cells.GATED, fast={cells.GRU}, ids=str))
def test_stepwise_gradcheck_through_the_op(cell, persistent):
    """fp64 gradcheck of the custom op (fast mode) on 2 groups x 2 column blocks."""
    args = problem(cell, 2, 17, 20, seed=2)
    names = [k for k, v in args.items() if v is not None]
    leaves = [args[k].clone().requires_grad_() for k in names]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        out, cs, _, h_n, c_n = gated_recurrence(*(given.get(k) for k in GATED_NAMES), "triton", False, cell.name, True)
        return (out, cs, h_n, c_n) if cs.numel() else (out, h_n)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    assert persistent["fwd"] > 0 and persistent["bwd"] > 0


# ----------------------------------------------------------------------------------------------
# Selection and fallbacks


@pytest.mark.skipif(DEVICE is None, reason="needs the triton backend")
def test_auto_and_blocked_run_the_blocked_kernels(persistent, monkeypatch):
    args = problem(cells.LSTM, 2, 5, 8, dtype=torch.float32)  # (fp64 has no persistent plan on a GPU)
    for value in ("auto", "blocked", "persistent"):
        monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", value)
        before = persistent["fwd"]
        triton_gated.gated_fwd(**args, cell=cells.LSTM.name)
        assert (persistent["fwd"] > before) == (value == "persistent"), value


@stepwise_only
def test_proj_size_runs_the_blocked_kernels(persistent):
    args = problem(cells.LSTM, 3, 20, 24, P=18, seed=4)
    with pytest.warns(UserWarning, match="proj_size has no persistent kernel"):
        compare_gated(cells.LSTM, args, tol=1e-12)
    assert persistent == {"fwd": 0, "bwd": 0}


@stepwise_only
def test_a_plan_that_does_not_fit_runs_the_blocked_kernels(monkeypatch, persistent):
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (1, 90))
    args = problem(cells.GRU, 2, 40, 40, dtype=torch.float32)  # 3 groups x 3 column blocks on 1 SM
    with pytest.warns(UserWarning, match="blocked kernels run"):
        compare_gated(cells.GRU, args, tol=tolerance(torch.float32))
    assert persistent == {"fwd": 0, "bwd": 0}


@stepwise_only
# The interpreter runs the programs one after another, so the barrier times out by design and the
# poisoned (NaN) states overflow in numpy before the blocked kernels rerun the call.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("cell", cells.GATED, ids=str)
def test_a_timed_out_barrier_reruns_on_the_blocked_kernels(cell, monkeypatch, persistent):
    """Non-stepwise in the sequential interpreter: the first program of a group of two waits for
    a sibling that has not started, times out, flags, and the call is answered by the blocked
    kernels (correct); the persistent path stays off for the process."""
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (132, 90))
    monkeypatch.setattr(triton_persistent, "SPIN_LIMIT", 8)
    args = problem(cell, 3, 5, 20, dtype=torch.float32)
    with pytest.warns(triton_rnn.PersistentKernelWarning, match="barrier wait timed out"):
        compare_gated(cell, args, tol=tolerance(torch.float32))
    assert persistent == {"fwd": 1, "bwd": 0}  # disabled after the first failure


# ----------------------------------------------------------------------------------------------
# First-use self-check of the persistent path (on CUDA by default; switched on here for CPU)


@stepwise_only
def test_self_check_passes_the_persistent_path(checked, persistent):
    args = problem(cells.GRU, 3, 4, 6, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", checked.SelfCheckWarning)
        compare_gated(cells.GRU, args)
    summary = checked.summary()
    assert "gated-persistent gru-cell float64" in summary and "FAILED" not in summary
    assert persistent["fwd"] >= 2  # the check's run and the call's


@stepwise_only
def test_a_wrong_persistent_kernel_fails_its_self_check_and_the_blocked_kernels_answer(checked, persistent,
                                                                                       monkeypatch):
    original = triton_gated_persistent.gated_persistent_fwd

    def wrong(*args, **kwargs):  # h_1 off by 1e-2 in one row
        original(*args, **kwargs)
        args[5][0, 0] += 1e-2
    monkeypatch.setattr(triton_gated_persistent, "gated_persistent_fwd", wrong)
    args = problem(cells.LSTM, 3, 4, 6, seed=6)
    with pytest.warns(checked.SelfCheckWarning, match="gated-persistent lstm-cell"):
        out = triton_gated.gated_fwd(**args, cell=cells.LSTM.name)[0]
    assert rel_err(out, loop.gated_fwd(**args, allow_tf32=False, cell=cells.LSTM)[0]) < 1e-12
    summary = checked.summary()
    assert "gated-persistent lstm-cell" in summary and "FAILED (out relative error" in summary
    assert "gated-blocked lstm-cell" in summary


# ----------------------------------------------------------------------------------------------
# On a GPU: the real barrier (not yet run on one)


@requires_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(5, 3, 1), (64, 32, 256), (7, 24, 100), (20, 9, 300), (256, 16, 256),
                                   (48, 8, 512)], ids=lambda s: "B{}-T{}-H{}".format(*s))
@pytest.mark.parametrize("cell", cells.GATED, ids=str)
def test_cuda_persistent_matches_the_loop(cell, shape, dtype, persistent):
    B, T, H = shape
    sm_count, arch = triton_rnn._gpu(torch.device("cuda"))
    if not planner.plan_persistent(B, H, dtype, sm_count, arch=arch, gates=cell.gates).fits:
        pytest.skip(f"the persistent path does not fit on {sm_count} SMs")
    args = gated_problem(cell, T, B, H, dtype=dtype, seed=B + T + H, device="cuda")
    tol = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        compare_gated(cell, args, tol=tol)
    assert persistent["fwd"] >= 1 and persistent["bwd"] >= 1  # (and the path's first-use self-check)
