"""The LSTM's and GRU's persistent kernels exactly as a GPU runs them: ``STEPWISE=False``, one
launch for all steps, the group barrier in the kernel, every program of the grid running at the
same time (tests/concurrent_interpreter.py runs the interpreter's programs in threads).

Each direction is checked on its own at the launcher (`triton_gated_persistent`), with every
workspace filled with NaN first and one program held back before each of its stores, so a read
of a sibling's value before it was written shows in every run: forward and backward against the
float64 reference loop on grids from 1x1 to 3x4 programs, the interleavings of the barrier's
atomics shaken by seeded random sleeps. Then the failure path (a barrier that can never complete
times out, flags, poisons with NaN, and the launcher reruns the call on the blocked kernels), and
barrier mutants: each broken barrier, patched into the kernels' source, must make that check
fail. Every launch runs under a deadline, so a hang fails instead of stalling CI.
"""
import warnings

import pytest
import torch

from fused_rnn import cells
from fused_rnn.ops import loop
from conftest import tiered
from helpers import TOLERANCE, compare_gated, count_persistent_launches, gated_problem, rel_err
from kernel_mutants import mutant, relaxed_barrier

triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
from concurrent_interpreter import UNTESTED, concurrent_programs  # noqa: E402
from fused_rnn.ops import planner, triton_gated_persistent, triton_persistent  # noqa: E402

pytestmark = [pytest.mark.skipif(not triton_rnn.INTERPRET, reason="runs the barrier through the Triton interpreter"),
              pytest.mark.skipif(UNTESTED is not None, reason=UNTESTED or "")]

# Seconds a launch may take before it counts as a hang (each takes 1-3 s).
DEADLINE = 90.0
# The last program of group 0 sleeps this long before each of its stores, so its siblings always
# run ahead of it: a barrier that lets them read its columns before it wrote them reads NaN in
# every run, however the threads are scheduled (without it some broken barriers passed 1 run in 5).
STRAGGLER_DELAY = 0.02
# A waiting program polls its counter once a millisecond, so a wait gives up after 1 s at least:
# the straggler holds its group up ~0.15 s a step.
POLL_INTERVAL = 1e-3
SPIN_LIMIT = 1000
TOL = 2 * TOLERANCE[torch.float32]

# (B, T, H, state, bias): the grid is ceil(B/16) x ceil(H/16) programs
CASES = {
    "1x1-B5-T3-H13": (5, 3, 13, "both", True),
    "2x2-B20-T3-H20-no-state": (20, 3, 20, "none", True),
    "3x4-B40-T4-H50": (40, 4, 50, "both", True),
    "2x3-B17-T1-H40-no-bias": (17, 1, 40, "h0", False),
    "3x3-B33-T3-H40-no-state": (33, 3, 40, "none", False),
}
FAST_CASES = {(cells.LSTM, "3x4-B40-T4-H50"), (cells.GRU, "3x3-B33-T3-H40-no-state")}


def gpu_plan(B, H, cell):
    """The plan the launcher makes on an H100 (132 SMs): not stepwise, the barrier in the kernel."""
    plan = planner.plan_persistent(B, H, torch.float32, 132, gates=cell.gates)
    assert plan.fits, plan.reason
    return plan


class Chain:
    """One problem of one cell: its float64 reference, and its persistent kernels run concurrently
    on fp32 workspaces filled with NaN."""

    def __init__(self, cell, B, T, H, state="both", bias=True, seed=0):
        self.cell, self.lstm = cell, cell is cells.LSTM
        self.args = gated_problem(cell, T, B, H, state=state, bias=bias, dtype=torch.float32, seed=seed)
        wide = {k: None if v is None else v.double() for k, v in self.args.items()}
        g = torch.Generator().manual_seed(seed + 1)
        self.grad_out = torch.randn(T, B, H, generator=g, dtype=torch.float64)
        self.grad_cs = torch.randn(T, B, H, generator=g, dtype=torch.float64) if self.lstm else None
        self.want_fwd = loop.gated_fwd(**wide, allow_tf32=False, cell=cell)
        self.want_bwd = loop.gated_bwd(self.grad_out, self.grad_cs, *self.want_fwd, **wide, allow_tf32=False,
                                       cell=cell)
        self.plan = gpu_plan(B, H, cell)
        self.T, self.B, self.H = T, B, H
        self.error = torch.zeros(1, dtype=torch.int32)

    def initial(self):
        a = self.args
        h_first = a["h0"] if a["h0"] is not None else torch.zeros(self.B, self.H)
        c_first = (a["c0"] if a["c0"] is not None else torch.zeros(self.B, self.H)) if self.lstm else h_first
        return h_first, c_first

    def forward(self, spin_limit=None):
        """``(out, cs, saved)`` of the persistent forward."""
        T, B, H = self.T, self.B, self.H
        out, saved = torch.full((T, B, H), float("nan")), torch.full((T, B, 4 * H), float("nan"))
        cs = torch.full((T, B, H), float("nan")) if self.lstm else out.new_empty(0)
        a = self.args
        triton_gated_persistent.gated_persistent_fwd(
            a["q"], a["w_hh"], a["b_hh"], *self.initial(), out, cs, saved, self.plan, self.error,
            stepwise=False, spin_limit=spin_limit, cell=self.cell)
        return out, cs, saved

    def backward(self, spin_limit=None):
        """``(grad_q, carry_h, share)`` of the persistent backward, run on the reference forward."""
        T, B, H, G = self.T, self.B, self.H, self.cell.gates
        out, cs, saved = (t.float() for t in self.want_fwd)
        grad_q, carry_h = torch.full((T, B, G * H), float("nan")), torch.full((T + 1, B, H), float("nan"))
        share = torch.zeros(2, B, H)
        triton_gated_persistent.gated_persistent_bwd(
            self.grad_out.float(), None if self.grad_cs is None else self.grad_cs.float(), out, cs, saved,
            *self.initial(), self.args["w_hh"], grad_q, carry_h, share, self.plan, self.error,
            stepwise=False, spin_limit=spin_limit, cell=self.cell)
        return grad_q, carry_h, share

    def run(self, direction, *, seed, deadline=DEADLINE, spin_limit=SPIN_LIMIT, lost_arrivals=frozenset()):
        """Runs ``direction`` ("fwd" or "bwd") concurrently: ``{name: (got, want)}`` of what it
        writes (the backward: grad_q, dL/dh_{t-1} for every t, the LSTM's dL/dc0); TimeoutError on
        a hang."""
        self.error.zero_()
        straggler = (0, self.plan.col_blocks - 1, 0)
        with concurrent_programs(timeout=deadline, shake_seed=seed, lost_arrivals=lost_arrivals,
                                 stragglers={straggler: STRAGGLER_DELAY}, poll_interval=POLL_INTERVAL):
            if direction == "fwd":
                return dict(zip(("out", "cs", "saved"), zip(self.forward(spin_limit), self.want_fwd)))
            grad_q, carry_h, share = self.backward(spin_limit)
        results = {"grad_q": (grad_q, self.want_bwd[0]), "carry_h": (carry_h[:self.T], self.carries())}
        if self.lstm:
            results["grad_c0"] = (share[self.T % 2], self.want_bwd[4])
        return results

    def check(self, direction, *, seed, **kwargs):
        """AssertionError if any output of ``direction`` differs from the reference (NaN: read
        before written) or the error flag is set; TimeoutError on a hang."""
        results = self.run(direction, seed=seed, **kwargs)
        assert int(self.error[0]) == 0, "a barrier wait timed out"
        for name, (got, want) in results.items():
            if want.numel():
                assert not got.isnan().any(), f"{name}: NaN (a read before the write)"
                assert rel_err(got, want) < TOL, f"{name}: relative error {rel_err(got, want):.1e}"

    def carries(self):
        """float64 dL/dh_{t-1} for t = 0..T-1 (slot t of carry_h), from the reference's grad_q."""
        T, H = self.T, self.H
        saved = self.want_fwd[2]
        da = self.want_bwd[0].clone()
        if not self.lstm:  # the GRU: da_n = dq_n * r
            da[..., 2 * H:] *= saved[..., :H]
        slots = torch.zeros(T + 1, self.B, H, dtype=torch.float64)
        for t in reversed(range(T)):
            slots[t] = da[t] @ self.args["w_hh"].double()
            if not self.lstm:  # and gh * z outside the product
                slots[t] += (self.grad_out[t] + slots[t + 1]) * saved[t, :, H:2 * H]
        return slots[:T]


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("cell,case", tiered([(cell, case) for cell in cells.GATED for case in CASES],
                                              fast=FAST_CASES, several_names=True), ids=str)
def test_barrier_matches_reference(cell, case, direction):
    B, T, H, state, bias = CASES[case]
    chain = Chain(cell, B, T, H, state, bias, seed=B + T + H)
    assert "x".join(map(str, chain.plan.grid)) == case.split("-")[0]
    chain.check(direction, seed=B * T * H)


@pytest.mark.exhaustive
@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("cell", cells.GATED, ids=str)
def test_barrier_under_shaken_interleavings(cell, direction, seed):
    """The largest grid again with other seeds for the random sleeps around every atomic."""
    Chain(cell, 44, 5, 60, seed=seed).check(direction, seed=seed)


# ----------------------------------------------------------------------------------------------
# Barrier mutants: each breaks the barrier in one way a real bug would; the check above must fail.


FWD, BWD = "gated_persistent_fwd_kernel", "gated_persistent_bwd_kernel"
FWD_WAIT = "_group_barrier(arrivals_ptr + group * T + t, n_col_blocks, spin_limit, ok)"
BWD_WAIT = "_group_barrier(arrivals_ptr + group * T + s, n_col_blocks, spin_limit, ok)"
H_STORE = "        tl.store(out_ptr + step[:, None] * H + units[None, :], new, mask=own)\n"
BWD_BARRIER = '''            if not STEPWISE:  # every sibling's dz_t written before this program's phase B reads them
                still_ok = _group_barrier(arrivals_ptr + group * T + s, n_col_blocks, spin_limit, ok)
                tl.store(error_ptr, 1, mask=(ok != 0) & (still_ok == 0))
                ok = still_ok
'''
PHASE_A = "        if s < T:  # phase A of step t = T-1-s, this program's units\n"
# name -> (kernel, edits)
MUTANTS = {
    "fwd-no-barrier": (FWD, [(FWD_WAIT, "ok")]),
    "fwd-one-arrival-short": (FWD, [(FWD_WAIT, FWD_WAIT.replace("n_col_blocks", "n_col_blocks - 1"))]),
    "fwd-one-arrival-too-many": (FWD, [(FWD_WAIT, FWD_WAIT.replace("n_col_blocks", "n_col_blocks + 1"))]),
    # h_t published after the arrival instead of before it
    "fwd-store-after-barrier": (FWD, [(H_STORE, ""), ("            ok = still_ok\n",
                                                     "            ok = still_ok\n" + H_STORE)]),
    "bwd-no-barrier": (BWD, [(BWD_WAIT, "ok")]),
    "bwd-one-arrival-short": (BWD, [(BWD_WAIT, BWD_WAIT.replace("n_col_blocks", "n_col_blocks - 1"))]),
    "bwd-one-arrival-too-many": (BWD, [(BWD_WAIT, BWD_WAIT.replace("n_col_blocks", "n_col_blocks + 1"))]),
    # the barrier between phase B and phase A instead of between phase A and phase B: phase B
    # reads the siblings' dz of the step before unguarded
    "bwd-phases-out-of-order": (BWD, [(BWD_BARRIER, ""), (PHASE_A, PHASE_A + BWD_BARRIER)]),
}
# Each mutant against the fast tier's check of its direction, on the cell and case it runs there;
# the rest in the exhaustive tier.
FAST_CASE = {cells.LSTM: "3x4-B40-T4-H50", cells.GRU: "3x3-B33-T3-H40-no-state"}
FAST_MUTANTS = {("fwd-one-arrival-short", cells.LSTM), ("fwd-store-after-barrier", cells.GRU),
                ("bwd-phases-out-of-order", cells.LSTM), ("bwd-one-arrival-too-many", cells.GRU)}


@pytest.mark.parametrize("name,cell", tiered([(name, cell) for name in MUTANTS for cell in cells.GATED],
                                              fast=FAST_MUTANTS, several_names=True), ids=str)
def test_a_broken_barrier_fails_the_check(name, cell, monkeypatch, tmp_path):
    kernel, edits = MUTANTS[name]
    monkeypatch.setattr(triton_gated_persistent, kernel,
                        mutant(getattr(triton_gated_persistent, kernel), edits, tmp_path))
    B, T, H, state, bias = CASES[FAST_CASE[cell]]
    chain = Chain(cell, B, T, H, state, bias, seed=B + T + H)  # the same problem and seed as there
    with pytest.raises((AssertionError, TimeoutError)):
        chain.check(name[:3], seed=B * T * H)


@pytest.mark.exhaustive
@pytest.mark.xfail(strict=True, reason="the interpreter's atomics and loads are sequentially consistent (C "
                   "atomics, numpy under the GIL): it cannot show a missing release/acquire; the compile "
                   "check's PTX test does (tests/test_compile_check.py)")
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_a_relaxed_barrier_fails_the_check(direction, monkeypatch, tmp_path):
    monkeypatch.setattr(triton_gated_persistent, "_group_barrier", relaxed_barrier(tmp_path))
    B, T, H, state, bias = CASES[FAST_CASE[cells.LSTM]]
    chain = Chain(cells.LSTM, B, T, H, state, bias, seed=B + T + H)
    with pytest.raises((AssertionError, TimeoutError)):
        chain.check(direction, seed=B * T * H)


# ----------------------------------------------------------------------------------------------
# The failure path: a barrier that can never complete


@pytest.mark.parametrize("cell", tiered(cells.GATED, fast={cells.LSTM}, ids=str))
def test_a_barrier_that_cannot_complete_times_out_flags_and_poisons(cell):
    """Program (0, 1)'s arrivals are lost, so group 0's counters stop one short: every wait of
    group 0 must time out within the bounded spin, the error flag must be set, what each of its
    programs owns after the failed wait must be NaN, and the launch must return. Group 1's
    barrier is intact: its outputs stay right."""
    chain = Chain(cell, 20, 4, 40, seed=5)  # 2 groups x 3 column blocks
    assert chain.plan.grid == (2, 3)
    group0, group1 = slice(0, chain.plan.block_b), slice(chain.plan.block_b, 20)

    fwd = chain.run("fwd", seed=0, spin_limit=200, lost_arrivals={(0, 1, 0)})
    assert int(chain.error[0]) == 1
    for name, (got, want) in fwd.items():
        if want.numel():
            assert rel_err(got[0, group0], want[0, group0]) < TOL, name  # computed before the first wait
            assert got[1:, group0].isnan().all(), name  # every program of group 0, every later step
            assert rel_err(got[:, group1], want[:, group1]) < TOL, name

    bwd = chain.run("bwd", seed=1, spin_limit=200, lost_arrivals={(0, 1, 0)})
    assert int(chain.error[0]) == 1
    got, want = bwd["grad_q"]
    assert rel_err(got[-1, group0], want[-1, group0]) < TOL  # phase A of the first step, before any wait
    assert got[:-1, group0].isnan().all() and bwd["carry_h"][0][:, group0].isnan().all()
    for name, (got, want) in bwd.items():
        assert rel_err(got[..., group1, :], want[..., group1, :]) < TOL, name


@pytest.fixture
def persistent_gpu_mode(monkeypatch):
    """The gated persistent kernels as the launchers run them on an H100 (132 SMs, sm_90), not
    stepwise; counts their launches: {"fwd": n, "bwd": n}."""
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    monkeypatch.setattr(triton_rnn, "PERSISTENT_STEPWISE", False)
    monkeypatch.setattr(triton_rnn, "_gpu", lambda device: (132, 90))
    triton_rnn.reset_persistent_state()
    yield count_persistent_launches(monkeypatch, gated=True)
    triton_rnn.reset_persistent_state()


@pytest.mark.parametrize("cell", tiered(cells.GATED, fast={cells.GRU}, ids=str))
def test_the_launchers_run_the_barrier_kernels(cell, persistent_gpu_mode):
    """`triton_gated.gated_fwd` / `gated_bwd` select the persistent kernels and their result
    (every output and gradient) is right, with no fallback."""
    args = gated_problem(cell, 3, 40, 50, dtype=torch.float32, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        with concurrent_programs(timeout=DEADLINE, shake_seed=8):
            compare_gated(cell, args, tol=TOL)
    assert persistent_gpu_mode == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("cell", tiered(cells.GATED, fast={cells.LSTM}, ids=str))
def test_a_failed_barrier_reruns_on_the_blocked_kernels(cell, monkeypatch, persistent_gpu_mode):
    """End to end: the launcher sees the flag, warns once, answers from the blocked kernels
    (every output and gradient right) and keeps the persistent path off for the process."""
    monkeypatch.setattr(triton_persistent, "SPIN_LIMIT", 200)
    args = gated_problem(cell, 3, 20, 40, dtype=torch.float32, seed=6)
    with concurrent_programs(timeout=DEADLINE, shake_seed=2, lost_arrivals={(1, 2, 0)}):
        with pytest.warns(triton_rnn.PersistentKernelWarning, match="barrier wait timed out") as caught:
            compare_gated(cell, args, tol=TOL)
        assert sum(issubclass(w.category, triton_rnn.PersistentKernelWarning) for w in caught) == 1
        assert persistent_gpu_mode == {"fwd": 1, "bwd": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
            compare_gated(cell, args, tol=TOL)  # the blocked kernels, no second warning
    assert persistent_gpu_mode == {"fwd": 1, "bwd": 0}
