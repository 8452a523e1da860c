"""The persistent kernels exactly as a GPU runs them: ``STEPWISE=False``, one launch for all
steps, the group barrier in the kernel, every program of the grid running at the same time
(tests/concurrent_interpreter.py runs the interpreter's programs in threads).

Forward and backward against the float64 reference on grids from 1x1 to 3x4 programs, with the
interleavings of the barrier's atomics shaken by seeded random sleeps; then the failure path: a
barrier that can never complete times out, flags, poisons with NaN, and the launcher reruns the
call on the blocked kernels. Every test runs under a deadline, so a hang fails instead of
stalling CI.

bf16 runs here although the interpreter computes bf16 *dots* wrongly (it multiplies the raw
bits; still so in Triton 3.6): the persistent kernels upcast the bf16 W_h slice and inputs to
fp32 on chip and multiply in fp32, as on a GPU, so no bf16 dot is executed. The launcher's
interpreter guard against bf16 (there for the blocked kernels, which do bf16 dots) is lifted in
these tests only, and any fallback to the blocked kernels fails the test.
"""
import warnings

import pytest
import torch

from fused_rnn import elman_reference, elman_rnn, fused_rnn, rnn_reference
from conftest import tiered
from helpers import cast, check_parity, count_persistent_launches, make_problem, rel_err

triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
from concurrent_interpreter import UNTESTED, concurrent_programs  # noqa: E402
from fused_rnn.ops import planner, triton_persistent  # noqa: E402

pytestmark = [pytest.mark.skipif(not triton_rnn.INTERPRET, reason="runs the barrier through the Triton interpreter"),
              pytest.mark.skipif(UNTESTED is not None, reason=UNTESTED or "")]

# Seconds a test may take before a launch still running counts as a hang (each takes 1-4 s).
DEADLINE = 90.0



def make_elman_problem(B, T, H, *, tokens, h0, bias, dtype, seed, nonlinearity):
    """nn.RNN's cell on dense input (``tokens`` is ignored: that cell has none)."""
    g = torch.Generator().manual_seed(seed)
    I, scale = 7, H ** -0.5

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype).requires_grad_()

    return dict(x=rand(B, T, I), w_ih=rand(H, I, s=I ** -0.5), w_hh=rand(H, H, s=scale),
                b_ih=rand(H, s=0.1) if bias else None, b_hh=rand(H, s=0.1) if bias else None,
                h0=rand(B, H, s=0.5) if h0 else None, nonlinearity=nonlinearity)


# The cells the persistent kernels run: name -> (function, reference, problem maker).
CELLS = {"course": (fused_rnn, rnn_reference, make_problem)}
for _nl in ("tanh", "relu"):
    CELLS[f"elman_{_nl}"] = (elman_rnn, elman_reference,
                             lambda *a, _nl=_nl, **k: make_elman_problem(*a, nonlinearity=_nl, **k))
ELMAN_CASES = ["1x1-B5-T3-H13-tokens", "3x4-B40-T4-H50-dense-zero-h0", "2x4-B17-T5-H64-dense-no-bias"]


@pytest.fixture
def persistent_gpu_mode(monkeypatch):
    """The persistent kernels as the launcher runs them on an H100 (132 SMs, sm_90), not stepwise;
    counts their launches: {"fwd": n, "bwd": n}."""
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (132, 90))
    runnable = triton_rnn._check_runnable
    # bf16: see the module docstring (no bf16 dot in the persistent kernels)
    monkeypatch.setattr(triton_rnn, "_check_runnable",
                        lambda t: None if t.dtype == torch.bfloat16 else runnable(t))
    triton_rnn.reset_persistent_state()
    yield count_persistent_launches(monkeypatch)
    triton_rnn.reset_persistent_state()


def grid_of(B, H, dtype):
    plan = planner.plan_persistent(B, H, dtype, 132)
    assert plan.fits
    return plan.grid


def check_against_reference(args, dtype, cell="course"):
    function, reference, _ = CELLS[cell]
    check_parity(args, dtype, "triton", function, reference)


# (B, T, H, tokens, h0, bias): the grid is ceil(B/16) x ceil(H/16) programs
CASES = {
    "1x1-B5-T3-H13-tokens": (5, 3, 13, True, True, True),
    "2x2-B20-T3-H20-dense-zero-h0": (20, 3, 20, False, False, True),
    "3x4-B40-T4-H50-tokens": (40, 4, 50, True, True, True),
    "3x4-B40-T4-H50-dense-zero-h0": (40, 4, 50, False, False, True),
    "3x3-B33-T1-H40-tokens-zero-h0": (33, 1, 40, True, False, True),
    "2x4-B17-T5-H64-dense-no-bias": (17, 5, 64, False, True, False),
}
BF16_CASES = ["3x4-B40-T4-H50-tokens", "2x2-B20-T3-H20-dense-zero-h0"]
# The fast tier: the largest grid (token input) for the course cell in fp32 and bf16, and one
# several-program grid per elman cell.
FAST_BARRIER_CASES = {("course", torch.float32, "3x4-B40-T4-H50-tokens"),
                      ("course", torch.bfloat16, "2x2-B20-T3-H20-dense-zero-h0"),
                      ("elman_tanh", torch.float32, "3x4-B40-T4-H50-dense-zero-h0"),
                      ("elman_relu", torch.float32, "2x4-B17-T5-H64-dense-no-bias")}


@pytest.mark.parametrize("cell,dtype,case",
                         tiered([("course", torch.float32, c) for c in CASES]
                                + [("course", torch.bfloat16, c) for c in BF16_CASES]
                                + [(cell, torch.float32, c) for cell in ("elman_tanh", "elman_relu")
                                   for c in ELMAN_CASES],
                                fast=FAST_BARRIER_CASES, several_names=True),
                         ids=lambda v: {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(v, v))
def test_barrier_matches_reference(case, dtype, cell, persistent_gpu_mode):
    B, T, H, tokens, h0, bias = CASES[case]
    assert "x".join(map(str, grid_of(B, H, dtype))) == case.split("-")[0]
    args = CELLS[cell][2](B, T, H, tokens=tokens, h0=h0, bias=bias, dtype=dtype, seed=B + T + H)
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        with concurrent_programs(timeout=DEADLINE, shake_seed=B * T * H):
            check_against_reference(args, dtype, cell)
    assert persistent_gpu_mode == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("seed", tiered([1, 2, 3], fast={1}))
def test_barrier_under_shaken_interleavings(seed, persistent_gpu_mode):
    """The largest grid again, with other seeds for the random sleeps and yields around every
    atomic: a missing acquire/release or a wrong counter shows as a wrong state or a hang."""
    args = make_problem(44, 6, 60, tokens=False, seed=seed)
    assert grid_of(44, 60, torch.float32) == (3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        with concurrent_programs(timeout=DEADLINE, shake_seed=seed):
            check_against_reference(args, torch.float32)
    assert persistent_gpu_mode == {"fwd": 1, "bwd": 1}


# ----------------------------------------------------------------------------------------------
# The failure path: a barrier that can never complete


def test_barrier_that_cannot_complete_times_out_flags_and_poisons():
    """Program (0, 1)'s arrivals are lost, so group 0's counters stop one short of their arrival
    count: every wait of group 0 must time out within the bounded spin, the error flag must be
    set, what each of its programs owns after the failed step must be NaN, and the launch must
    return. Group 1's barrier is intact: its states stay right."""
    B, T, H = 20, 4, 40  # 2 groups x 3 column blocks
    args = make_problem(B, T, H, tokens=False, seed=5)
    proj = torch.nn.functional.linear(args["x"], args["w_in"], args["b_in"]).detach().contiguous()
    w_h, b_h, h0 = args["w_h"].detach(), args["b_h"].detach(), args["h0"].detach()
    plan = planner.plan_persistent(B, H, torch.float32, 132)
    assert plan.grid == (2, 3)
    want, _ = rnn_reference(**cast(args, torch.float64))
    group0, group1 = slice(0, plan.block_b), slice(plan.block_b, B)

    ws = torch.zeros(B, T + 1, H)
    ws[:, 0] = h0
    error = torch.zeros(1, dtype=torch.int32)
    with concurrent_programs(timeout=DEADLINE, shake_seed=0, lost_arrivals={(0, 1, 0)}):
        triton_persistent.persistent_fwd(proj, None, w_h, b_h, ws, plan, error, stepwise=False,
                                         spin_limit=200)
    assert int(error[0]) == 1
    assert rel_err(ws[group0, 1], want[group0, 0]) < 1e-5  # computed before the first wait
    assert torch.isnan(ws[group0, 2:]).all()  # every program of group 0, every later step
    assert rel_err(ws[group1, 1:], want[group1]) < 1e-5

    # Backward: the chain c_t, run on the (finite) reference states
    ws_ok = torch.cat([h0[:, None], want.float()], 1)
    grad_out = torch.randn(B, T, H, generator=torch.Generator().manual_seed(1))
    c = torch.zeros_like(ws)
    c[:, T] = 0.5
    c_want = c.double().clone()
    for t in reversed(range(T)):
        dz = (grad_out[:, t].double() + c_want[:, t + 1]) * (1 - ws_ok[:, t + 1].double() ** 2)
        c_want[:, t] = dz @ w_h.double()
    error.zero_()
    with concurrent_programs(timeout=DEADLINE, shake_seed=1, lost_arrivals={(0, 1, 0)}):
        triton_persistent.persistent_bwd(grad_out, ws_ok, w_h, c, plan, error, stepwise=False,
                                         spin_limit=200)
    assert int(error[0]) == 1
    assert rel_err(c[group0, T - 1], c_want[group0, T - 1]) < 1e-5
    assert torch.isnan(c[group0, :T - 1]).all()
    assert rel_err(c[group1], c_want[group1]) < 1e-5


def test_failed_barrier_reruns_on_blocked_kernels(monkeypatch, persistent_gpu_mode):
    """End to end: the launcher sees the flag, warns once, answers from the blocked kernels
    (correct results, every gradient) and keeps the persistent path off for the process."""
    monkeypatch.setattr(triton_persistent, "SPIN_LIMIT", 200)
    args = make_problem(20, 3, 40, seed=6)
    with concurrent_programs(timeout=DEADLINE, shake_seed=2, lost_arrivals={(1, 2, 0)}):
        with pytest.warns(triton_rnn.PersistentKernelWarning, match="barrier wait timed out") as caught:
            check_against_reference(args, torch.float32)
        assert sum(issubclass(w.category, triton_rnn.PersistentKernelWarning) for w in caught) == 1
        assert persistent_gpu_mode == {"fwd": 1, "bwd": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
            check_against_reference(args, torch.float32)  # blocked kernels, no second warning
    assert persistent_gpu_mode == {"fwd": 1, "bwd": 0}


def test_a_hang_fails_within_the_deadline():
    """The deadline itself: a launch whose barrier spins far longer than allowed raises
    TimeoutError instead of stalling (its programs are cancelled at their next atomic)."""
    B, T, H = 5, 2, 20  # 1 group x 2 column blocks
    args = make_problem(B, T, H, tokens=False)
    proj = torch.nn.functional.linear(args["x"], args["w_in"], args["b_in"]).detach().contiguous()
    plan = planner.plan_persistent(B, H, torch.float32, 132)
    ws = torch.zeros(B, T + 1, H)
    error = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TimeoutError, match="did not finish"):
        with concurrent_programs(timeout=2.0, lost_arrivals={(0, 0, 0)}):
            triton_persistent.persistent_fwd(proj, None, args["w_h"].detach(), args["b_h"].detach(),
                                             ws, plan, error, stepwise=False, spin_limit=1 << 30)
