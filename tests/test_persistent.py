"""The persistent split-H kernels, their planner, kernel selection and the deterministic
token-table gradient.

Without a GPU the persistent kernels run in stepwise mode (one launch per step, the launch
boundary standing in for the group barrier): the same tile code, so these tests check the split
tiling (several groups x several column blocks, odd B and H, T = 1) against the reference. The
barrier itself runs here only where it cannot block (one program per group) or must time out.
"""
import os
import warnings

import pytest
import torch

from fused_rnn import fused_rnn
from fused_rnn.ops import planner
from conftest import TRITON_DEVICE as DEVICE, exhaustive, requires_cuda, requires_triton, tiered
import helpers
from helpers import count_persistent_launches, make_problem, rel_err, run_with_grads

triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
from fused_rnn.ops import triton_persistent  # noqa: E402

INTERPRET = triton_rnn.INTERPRET


@pytest.fixture
def persistent(monkeypatch):
    """Selects the persistent kernels and counts their launches: {"fwd": n, "bwd": n}."""
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    triton_rnn.reset_persistent_state()
    yield count_persistent_launches(monkeypatch)
    triton_rnn.reset_persistent_state()


def check_parity(args, dtype):
    helpers.check_parity(args, dtype, "triton")


# ----------------------------------------------------------------------------------------------
# The planner


def test_planner_design_shape():
    plan = planner.plan_persistent(256, 256, torch.float32, 132)
    assert plan.fits and (plan.block_b, plan.block_n, plan.h_pad) == (16, 16, 256)
    assert plan.grid == (16, 16) and plan.precision == "ieee"


def test_planner_pads_odd_hidden_sizes():
    plan = planner.plan_persistent(7, 384, torch.bfloat16, 132)
    assert plan.fits and plan.h_pad == 512 and plan.col_blocks == -(-384 // plan.block_n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_planner_grid_is_resident(dtype):
    """Every plan's grid fits the SMs at the co-residency it assumes, and a grid too large for
    every tiling is refused, not planned."""
    for arch, sm_count in ((80, 108), (90, 1), (90, 8), (90, 132)):
        for B in (1, 17, 64, 256, 1000, 4096):
            for H in (1, 16, 100, 256, 384, 512, 1000, 1024):
                plan = planner.plan_persistent(B, H, dtype, sm_count, arch=arch)
                if plan.fits:
                    assert plan.groups * plan.col_blocks <= sm_count * plan.programs_per_sm
                    shared = planner.shared_bytes(plan.block_b, plan.block_n, plan.h_pad)
                    assert shared <= planner.SHARED_PER_BLOCK[arch]
                    assert plan.programs_per_sm <= planner.programs_per_sm(0, shared, plan.num_warps, arch)
                    assert plan.groups * plan.block_b >= B and plan.col_blocks * plan.block_n >= H
                    assert plan.h_pad >= H and plan.block_n <= plan.h_pad
                else:
                    assert plan.reason
    assert not planner.plan_persistent(4096, 1024, dtype, 132).fits


def test_planner_refusals():
    assert not planner.plan_persistent(64, 256, torch.float64, 132).fits
    assert not planner.plan_persistent(64, 2048, torch.float32, 132).fits
    assert not planner.plan_persistent(64, 256, torch.float32, 132, allow_tf32=True).fits
    with pytest.raises(ValueError):
        planner.plan_persistent(0, 256, torch.float32, 132)
    with pytest.raises(ValueError):
        planner.plan_persistent(64, 256, torch.float32, None)


def test_planner_stepwise_uses_small_tiles_for_every_dtype():
    plan = planner.plan_persistent(33, 40, torch.float64, None, stepwise=True)
    assert plan.fits and plan.grid == (3, 3) and plan.programs_per_sm == 0


def test_programs_per_sm_arithmetic():
    assert planner.programs_per_sm(128, 32768, 4, 90) == 4  # registers bound
    assert planner.programs_per_sm(255, 32768, 8, 90) == 1
    assert planner.programs_per_sm(32, 120000, 4, 90) == 1  # shared memory bound
    assert planner.programs_per_sm(32, 120000, 4, 80) == 1
    assert planner.programs_per_sm(32, 170000, 4, 80) == 0


def test_plans_carry_their_tilings_register_cap():
    """A tiling that needs ptxas's maxnreg (one-gate 16x32 at H_PAD=512) hands it to the plan the
    launcher and compile_check use; the others leave ptxas its choice; the cap keeps the planned
    programs resident."""
    plan = planner.plan_persistent(256, 512, torch.float32, 132)
    assert (plan.block_n, plan.num_warps, plan.max_registers) == (32, 4, 255)
    assert planner.programs_per_sm(plan.max_registers, 0, plan.num_warps) >= plan.programs_per_sm
    assert planner.plan_persistent(64, 256, torch.float32, 132).max_registers is None
    assert planner.plan_persistent(33, 40, torch.float64, None, stepwise=True).max_registers is None


# ----------------------------------------------------------------------------------------------
# Stepwise mode: the split tiling against the reference

# (B, T, H): 3 groups x 3 column blocks; T = 1; odd B and H in one tile; H = 1; a ragged last
# group and column block.
SPLIT_SHAPES = [(33, 3, 40), (5, 1, 17), (1, 2, 1), (20, 4, 33)]


@pytest.mark.skipif(not INTERPRET, reason="stepwise mode is the interpreter's")
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
@pytest.mark.parametrize("shape", tiered(SPLIT_SHAPES, fast={(33, 3, 40), (1, 2, 1)}),
                         ids=lambda s: "B{}-T{}-H{}".format(*s))
def test_stepwise_fp32_matches_reference(shape, tokens, persistent):
    B, T, H = shape
    args = make_problem(B, T, H, tokens=tokens, device=DEVICE, seed=B + T + H)
    check_parity(args, torch.float32)
    assert persistent == {"fwd": 1, "bwd": 1}


@pytest.mark.skipif(not INTERPRET, reason="stepwise mode is the interpreter's")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_stepwise_fp64_matches_reference(bias, persistent):
    args = make_problem(18, 3, 35, bias=bias, dtype=torch.float64, device=DEVICE)
    check_parity(args, torch.float64)
    assert persistent == {"fwd": 1, "bwd": 1}


@pytest.mark.skipif(not INTERPRET, reason="stepwise mode is the interpreter's")
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
@pytest.mark.parametrize("shape,fast", [pytest.param((2, 2, 3), False, marks=exhaustive), ((17, 2, 20), True)],
                         ids=["B2-T2-H3", "B17-T2-H20-fast"])
def test_stepwise_gradcheck_fp64(shape, fast, tokens, persistent):
    """Full gradcheck on one tile; on 2 groups x 2 column blocks gradcheck's fast mode (random
    projections) keeps the interpreter's cost down."""
    B, T, H = shape
    args = make_problem(B, T, H, E=3, V=4, tokens=tokens, dtype=torch.float64, device=DEVICE)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return fused_rnn(**{**args, **dict(zip(names, tensors))}, backend="triton")

    assert torch.autograd.gradcheck(fn, [args[k] for k in names], fast_mode=fast)
    assert persistent["fwd"] > 0 and persistent["bwd"] > 0


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(5, 3, 1), (64, 64, 256), (7, 24, 384), (20, 9, 300), (256, 16, 512),
                                   (33, 40, 1024)],
                         ids=lambda s: "B{}-T{}-H{}".format(*s))
def test_cuda_persistent_matches_reference(shape, dtype, persistent):
    """The real barrier on a GPU: the kernels must run (no fallback warning) and match."""
    B, T, H = shape
    sm_count, arch = triton_rnn._gpu(torch.device("cuda"))
    if not planner.plan_persistent(B, H, dtype, sm_count, arch=arch).fits:
        pytest.skip(f"the persistent path does not fit on {sm_count} SMs")
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        check_parity(make_problem(*shape, E=32, dtype=dtype, device="cuda"), dtype)
    assert persistent == {"fwd": 1, "bwd": 1}


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inputs", [dict(tokens=False), dict(h0=False), dict(bias=False),
                                    dict(tokens=False, h0=False, bias=False)],
                         ids=["dense", "zero-h0", "no-bias", "dense-zero-h0-no-bias"])
@pytest.mark.parametrize("shape", [(20, 9, 300), (64, 64, 256)], ids=lambda s: "B{}-T{}-H{}".format(*s))
def test_cuda_persistent_input_variants(shape, inputs, dtype, persistent):
    """The other input cases of the parity test above: dense input, no h0, no biases."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        check_parity(make_problem(*shape, E=32, dtype=dtype, device="cuda", **inputs), dtype)
    assert persistent == {"fwd": 1, "bwd": 1}


@requires_cuda
@pytest.mark.parametrize("kernel", ["blocked", "persistent"])
def test_cuda_call_has_no_host_sync(kernel, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", kernel)
    args = make_problem(16, 8, 64, device="cuda")
    lengths = torch.tensor([8, 3] * 8, device="cuda")
    run_with_grads(lambda **a: fused_rnn(**a, backend="triton", lengths=lengths), args)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        # the range checks of ids and lengths, both kernels; backward without lengths (whose
        # index backward is PyTorch's, not ours)
        with torch.no_grad():
            fused_rnn(**args, backend="triton", lengths=lengths)
        fused_rnn(**args, backend="triton")[0].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ----------------------------------------------------------------------------------------------
# The barrier, where the interpreter can run it


@pytest.mark.skipif(not INTERPRET, reason="runs the barrier kernel through the interpreter")
def test_barrier_with_one_program_per_group_runs_through(monkeypatch, persistent):
    """One column block per group: each program is its group's only arrival, so the real
    (non-stepwise) kernels with their atomics and spins complete in the interpreter."""
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (132, 90))
    args = make_problem(21, 3, 13, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        check_parity(args, torch.float32)
    assert persistent == {"fwd": 1, "bwd": 1}


@pytest.mark.skipif(not INTERPRET, reason="runs the barrier kernel through the interpreter")
def test_barrier_timeout_sets_flag_and_nan():
    """Two column blocks run one after another: the first program's waits must time out,
    flag the error and write NaN into what it owns from then on."""
    B, T, H = 3, 4, 20
    args = make_problem(B, T, H, tokens=False)
    proj = torch.nn.functional.linear(args["x"], args["w_in"], args["b_in"]).detach().contiguous()
    w_h, b_h = args["w_h"].detach(), args["b_h"].detach()
    plan = planner.plan_persistent(B, H, torch.float32, 132)
    assert plan.col_blocks == 2
    ws = torch.zeros(B, T + 1, H)
    error = torch.zeros(1, dtype=torch.int32)
    triton_persistent.persistent_fwd(proj, None, w_h, b_h, ws, plan, error, stepwise=False, spin_limit=8)
    assert int(error[0]) == 1
    assert torch.isnan(ws[:, 2:, :plan.block_n]).all()  # the timed-out program's later steps
    assert torch.isnan(ws[:, -1]).any()
    c = torch.zeros_like(ws)
    error.zero_()
    triton_persistent.persistent_bwd(torch.ones(B, T, H), ws.nan_to_num(), w_h, c, plan, error,
                                     stepwise=False, spin_limit=8)
    assert int(error[0]) == 1 and torch.isnan(c[:, :T - 1, :plan.block_n]).all()


@pytest.mark.skipif(not INTERPRET, reason="runs the barrier kernel through the interpreter")
# The interpreter runs the programs one after another, so the barrier times out by design and the
# poisoned (NaN / huge) states overflow in numpy before the blocked kernels rerun the call.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_timeout_warns_and_reruns_on_blocked_kernels(monkeypatch, persistent):
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (132, 90))
    monkeypatch.setattr(triton_persistent, "SPIN_LIMIT", 8)
    args = make_problem(5, 3, 20, device=DEVICE)
    with pytest.warns(triton_rnn.PersistentKernelWarning, match="barrier wait timed out"):
        check_parity(args, torch.float32)  # correct: the blocked kernels reran the call
    assert persistent == {"fwd": 1, "bwd": 0}  # disabled after the first failure
    check_parity(args, torch.float32)
    assert persistent == {"fwd": 1, "bwd": 0}


# ----------------------------------------------------------------------------------------------
# Kernel selection


@requires_triton
def test_kernel_variable_is_read_on_every_call(monkeypatch, persistent):
    args = make_problem(3, 2, 8, device=DEVICE)
    for value, expected in (("blocked", 0), ("persistent", 1), ("auto", 1), ("PERSISTENT", 2)):
        monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", value)
        fused_rnn(**args, backend="triton")
        assert persistent["fwd"] == expected, value


def test_auto_plans_the_persistent_forward_on_a_gpu_for_long_sequences(monkeypatch):
    # (the plan alone: nothing launches) auto = the persistent forward where it fits on a GPU and
    # T >= 16; the blocked kernels for short sequences, the backward (not yet timed on a GPU), in
    # the interpreter and where the planner says no
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (132, 90))
    monkeypatch.setattr(triton_rnn, "_check_earlier_launches", lambda device: None)
    w_h = torch.zeros(256, 256)
    T = triton_rnn.AUTO_PERSISTENT_MIN_T
    for value, B, steps, planned in (("auto", 64, T, True), ("auto", 64, T - 1, False),
                                     ("auto", 4096, T, False), ("blocked", 64, T, False),
                                     ("persistent", 64, 1, True)):
        monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto falls back without a warning
            plan = triton_rnn._persistent_plan(B, steps, 256, w_h, False)
        assert (plan is not None) == planned, (value, B, steps)
        backward = triton_rnn._persistent_plan(B, steps, 256, w_h, False, backward=True)
        assert (backward is not None) == (planned and value == "persistent"), (value, B, steps)
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", True)
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "auto")
    assert triton_rnn._persistent_plan(64, 512, 256, w_h, False) is None


@requires_triton
def test_bad_kernel_variable(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "fastest")
    with pytest.raises(ValueError, match="FUSED_RNN_TRITON_KERNEL"):
        fused_rnn(**make_problem(2, 2, 4, device=DEVICE), backend="triton")


@pytest.mark.skipif(not INTERPRET, reason="the interpreter plans stepwise without SMs")
def test_persistent_that_does_not_fit_runs_blocked(monkeypatch, persistent):
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (1, 90))
    args = make_problem(40, 2, 40, device=DEVICE)  # 3 groups x 3 column blocks on 1 SM
    with pytest.warns(UserWarning, match="blocked kernels run"):
        check_parity(args, torch.float32)
    assert persistent == {"fwd": 0, "bwd": 0}


# ----------------------------------------------------------------------------------------------
# Deterministic token-table gradient


@requires_triton
def test_token_table_grad_deterministic_kernel():
    g = torch.Generator().manual_seed(0)
    V, H = 9, 130  # id 8 never occurs; two column blocks
    ids = torch.randint(0, 8, (7, 5), generator=g).to(DEVICE)
    dp = torch.randn(7, 5, H, generator=g, dtype=torch.float64).to(DEVICE)
    want = torch.zeros(V, H, dtype=torch.float64, device=DEVICE).index_add_(0, ids.reshape(-1), dp.reshape(-1, H))
    got = triton_rnn.token_table_grad(ids, dp, V, deterministic=True)
    assert rel_err(got, want) < 1e-14 and not got[8].any()
    assert torch.equal(got, triton_rnn.token_table_grad(ids, dp, V, deterministic=True))


@requires_triton
@pytest.mark.skipif(DEVICE == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                    reason="deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before CUDA starts")
def test_deterministic_mode_uses_the_sorted_kernel(monkeypatch):
    calls = []
    original = triton_rnn.token_table_grad

    def spy(ids, dp, V, deterministic=False):
        calls.append(deterministic)
        return original(ids, dp, V, deterministic)
    monkeypatch.setattr(triton_rnn, "token_table_grad", spy)
    args = make_problem(6, 4, 20, device=DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        first = run_with_grads(lambda **a: fused_rnn(**a, backend="triton"), args)
        second = run_with_grads(lambda **a: fused_rnn(**a, backend="triton"), args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == [True, True]
    for name in first:
        assert torch.equal(first[name], second[name]), name
    check_parity(args, torch.float32)
    assert calls[-1] is False


@requires_triton
def test_flag_from_an_earlier_launch_disables_the_persistent_path(persistent):
    """On CUDA the timeout flag is read at the next call from a pinned copy, once the copy's
    event has completed (no sync); here the copy is faked as landed and set."""
    class Landed:
        def query(self):
            return True
    device = torch.empty(0, device=DEVICE).device  # with its index, as the launchers key it
    error = triton_rnn._error_flag(device)
    triton_rnn._persistent.flags[device] = (error, torch.ones(1, dtype=torch.int32), Landed())
    args = make_problem(3, 2, 8, device=DEVICE)
    with pytest.warns(triton_rnn.PersistentKernelWarning, match="earlier call"):
        check_parity(args, torch.float32)
    assert persistent == {"fwd": 0, "bwd": 0}
