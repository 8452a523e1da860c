"""The LSTM's and GRU's Triton kernels (fused_rnn/ops/triton_gated.py) at the kernel interface,
against the reference loop's ``gated_fwd`` / ``gated_bwd`` (ops/loop.py) tensor by tensor in
float64 and float32, over odd sizes and every optional input, on small tiles that split rows,
units and every K loop into several blocks, through fp64 gradcheck of the custom op, the
accuracy of their sigmoid and tanh, and their first-use self-check (switched on here for CPU
tensors). Without a GPU they run through the Triton interpreter."""
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fused_rnn import cells
from fused_rnn.gated_op import gated_recurrence
from fused_rnn.ops import loop
from conftest import TRITON_DEVICE as DEVICE, exhaustive, requires_triton, tiered
from helpers import GATED_NAMES as NAMES, TOLERANCE, compare_gated as compare, gated_problem, rel_err

triton_gated = pytest.importorskip("fused_rnn.ops.triton_gated")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_rnn.ops.triton_cells import _sigmoid, _tanh  # noqa: E402

pytestmark = requires_triton


def problem(cell, T, B, H, P=0, state="both", bias=True, dtype=torch.float64, seed=0):
    return gated_problem(cell, T, B, H, P, state, bias, dtype, seed, device=DEVICE)


# (cell, T, B, H, P, state, bias, grad_cs)
CASES = [
    (cells.LSTM, 5, 9, 20, 0, "both", True, True),
    (cells.LSTM, 4, 5, 13, 7, "none", True, False),
    (cells.LSTM, 3, 3, 6, 0, "c0", True, False),
    (cells.LSTM, 1, 2, 5, 3, "h0", True, True),
    (cells.GRU, 5, 9, 20, 0, "both", True, False),
    (cells.GRU, 4, 5, 13, 0, "none", False, False),
    (cells.GRU, 1, 1, 1, 0, "both", False, False),
    (cells.LSTM, 2, 3, 1, 0, "both", True, True),
]


def case_id(c):
    cell, T, B, H, P, state, bias, grad_cs = c
    return (f"{cell.name}-T{T}-B{B}-H{H}" + (f"-P{P}" if P else "") + f"-{state}"
            + ("-bias" if bias and cell.hidden_bias else "") + ("-grad_cs" if grad_cs else ""))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", tiered(CASES, fast=CASES[:6], ids=case_id))
def test_kernels_match_the_loop(case, dtype):
    cell, T, B, H, P, state, bias, grad_cs = case
    args = problem(cell, T, B, H, P, state, bias, dtype=dtype, seed=T * B + H)
    compare(cell, args, grad_cs, tol=1e-12 if dtype == torch.float64 else 2 * TOLERANCE[torch.float32])


@pytest.mark.parametrize("cell,P", [(cells.LSTM, 0), (cells.LSTM, 18), (cells.GRU, 0)], ids=["lstm", "lstm-proj", "gru"])
def test_several_tiles(cell, P, monkeypatch):
    """Small tiles, as on a GPU: 3 row blocks (the last ragged), 3 unit blocks of H = 37, K loops
    over several tiles (the GRU's backward over 3H = 111 gate rows, across the n rows' start)."""
    monkeypatch.setattr(triton_gated, "gated_config", lambda *args, **kwargs: triton_gated.GatedConfig(4, 16, 16, 1))
    compare(cell, problem(cell, T=4, B=9, H=37, P=P, seed=3), grad_cs=True)


def test_the_triton_backend_runs_these_kernels():
    from fused_rnn.dispatch import gated_kernels

    assert gated_kernels("triton") is triton_gated


def gradcheck_fn(cell, args):
    names = [k for k, v in args.items() if v is not None]
    leaves = [args[k].clone().requires_grad_() for k in names]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        out, cs, _, h_n, c_n = gated_recurrence(*(given.get(k) for k in NAMES), "triton", False, cell.name, True)
        return (out, cs, h_n, c_n) if cs.numel() else (out, h_n)
    return fn, leaves


GRADCHECK_CASES = [(cells.LSTM, 0), (cells.LSTM, 2), (cells.GRU, 0)]


@pytest.mark.parametrize("cell,P", GRADCHECK_CASES, ids=["lstm", "lstm-proj", "gru"])
def test_gradcheck_through_the_op(cell, P):
    """fp64 gradcheck of the custom op on the Triton kernels (fast mode in the fast tier)."""
    fn, leaves = gradcheck_fn(cell, problem(cell, T=4, B=3, H=5, P=P, seed=2))
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@exhaustive
@pytest.mark.parametrize("cell,P", GRADCHECK_CASES, ids=["lstm", "lstm-proj", "gru"])
@pytest.mark.parametrize("state", ["both", "none"])
def test_gradcheck_full_mode(cell, P, state):
    fn, leaves = gradcheck_fn(cell, problem(cell, T=3, B=2, H=3, P=P, state=state, seed=4))
    assert torch.autograd.gradcheck(fn, leaves)


@exhaustive
@pytest.mark.parametrize("cell,P", [(cells.LSTM, 0), (cells.LSTM, 40), (cells.GRU, 0)], ids=["lstm", "lstm-proj", "gru"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_larger_problems(cell, P, dtype):
    args = problem(cell, T=12, B=70, H=100, P=P, dtype=dtype, seed=11)
    compare(cell, args, tol=1e-12 if dtype == torch.float64 else 4 * TOLERANCE[torch.float32])


@triton.jit
def _activations_kernel(x_ptr, sig_ptr, tanh_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    x = tl.load(x_ptr + i, mask=ok, other=0.0)
    tl.store(sig_ptr + i, _sigmoid(x), mask=ok)
    tl.store(tanh_ptr + i, _tanh(x), mask=ok)


def _activations(x):
    sig, th = torch.empty_like(x), torch.empty_like(x)
    _activations_kernel[(triton.cdiv(x.numel(), 4096),)](x, sig, th, x.numel(), BLOCK=4096)
    return sig, th


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sigmoid_and_tanh_are_accurate_to_rounding(dtype):
    """Relative error within 2 ulps of 1.0 over the normal range, large negative inputs included
    (sigmoid(-80) = 1.8e-35: 1 - 1/(1+e^-x) would give 0): the interpreter's division is IEEE;
    a GPU's `/` is within 2 ulps more, so 4 there (the exp is the same polynomial on both). fp64
    (tests only) within 512 ulps (tanh's 1 - e cancels up to ~500x near |x| = 1e-3, measured
    142 ulps). Exact saturation; NaN and infinities."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(1 << 17, generator=g, dtype=torch.float64) * 4,
                   torch.rand(1 << 15, generator=g, dtype=torch.float64) * 175 - 87.4,
                   torch.rand(1 << 15, generator=g, dtype=torch.float64) * 0.6 - 0.3,
                   torch.tensor([-87.0, -80.0, -40.0, -20.0, -1e-3, -1e-8, -1e-30, 0.0, 1e-30, 1e-8, 0.06, 0.07])])
    x = x.to(dtype).to(DEVICE)
    sig, th = _activations(x)
    ulps = (4 if DEVICE == "cuda" else 2) if dtype == torch.float32 else 512
    bound = ulps * (2.0 ** -23 if dtype == torch.float32 else 2.0 ** -52)
    want_sig, want_tanh = torch.sigmoid(x.double()), torch.tanh(x.double())
    assert ((sig.double() - want_sig).abs() / want_sig).max() < bound
    assert ((th.double() - want_tanh).abs() / want_tanh.abs().clamp_min(1e-300)).max() < bound
    # fp32 saturates at |x| = 9.5 (where tanh rounds to 1); fp64 at 40 (sigmoid's 1 - 4e-18)
    edge = 9.5 if dtype == torch.float32 else 40.0
    special = torch.tensor([math.nan, -math.inf, -200.0, -edge, edge, 100.0, math.inf], dtype=dtype, device=DEVICE)
    sig, th = _activations(special)
    below = 0.0 if dtype == torch.float32 else pytest.approx(math.exp(-200.0), rel=1e-14)  # fp32: subnormal -> 0
    assert sig[0].isnan() and th[0].isnan()
    assert sig[1] == 0.0 and sig[2].item() == below and sig[-2:].tolist() == [1.0, 1.0]
    assert th[1:4].tolist() == [-1.0, -1.0, -1.0] and th[4:].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("cell", [cells.LSTM, cells.GRU], ids=str)
def test_self_check_passes_the_kernels(cell, checked):
    args = problem(cell, T=3, B=4, H=6, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", checked.SelfCheckWarning)
        compare(cell, args)
    assert "gated-blocked" in checked.summary() and "FAILED" not in checked.summary()


def test_a_wrong_kernel_fails_the_self_check_and_the_loop_answers(checked, monkeypatch):
    kernel = triton_gated.gated_fwd_kernel

    class Wrong:  # the forward kernel with h_1 off by 1e-2 in one row
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernel[grid](*args, **kwargs)
                args[6][0, 0] += 1e-2
            return launch
    monkeypatch.setattr(triton_gated, "gated_fwd_kernel", Wrong())
    args = problem(cells.LSTM, T=3, B=4, H=6, seed=6)
    with pytest.warns(checked.SelfCheckWarning, match="gated-blocked lstm-cell"):
        out = triton_gated.gated_fwd(**args, allow_tf32=False, cell=cells.LSTM.name)[0]
    assert rel_err(out, loop.gated_fwd(**args, allow_tf32=False, cell=cells.LSTM.name)[0]) < 1e-12
    assert "FAILED (out relative error" in checked.summary()


def compile_rows(*args):
    """The gated kernels' rows of ``python -m fused_rnn.compile_check`` (without the interpreter,
    whose kernels cannot be compiled) as lists of cells; asserts the run passed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fused_rnn.compile_check", *args], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    return [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| gated_")]


# The launcher's blocked tilings compile without a spill (ptxas -v): one cell, one size in the fast
# tier; both cells, both targets, the three GPU dtypes, aligned and odd H in the exhaustive one.
# (The persistent ones: tests/test_compile_check.py.)
COMPILES = [
    ("sm_90", "256", "fp32", "gru", 3),
    ("sm_90", "100,512", "fp32,bf16,fp16", "lstm,gru", 54),
    ("sm_80", "100,512", "fp32,bf16,fp16", "lstm,gru", 54),
]


@pytest.mark.parametrize("arch,hidden,dtypes,cell_names,kernels", tiered(
    COMPILES, fast=COMPILES[:1], ids=lambda c: "-".join(c[:4]), several_names=True))
def test_the_kernels_compile_without_spills(arch, hidden, dtypes, cell_names, kernels):
    rows = compile_rows("--arch", arch, "--hidden-sizes", hidden, "--dtypes", dtypes, "--cells", cell_names,
                        "--batch-sizes", "64", "--families", "blocked")
    assert len(rows) == kernels
    assert all(int(row[6]) == 0 for row in rows), [row for row in rows if row[6] != "0"]
