"""The first-use self-check of the Triton kernel paths (fused_rnn/ops/self_check.py).

On CUDA it checks every path before its first answer. Here it is switched on for CPU tensors
(the interpreter), and a wrong kernel is injected by monkeypatching: the check must catch it,
warn naming the path, and the call must still answer correctly from the next path down
(persistent -> blocked -> the plain loop); `fused_rnn.backends()` must say so.
"""
import warnings

import pytest
import torch

import fused_rnn as fr
from conftest import TRITON_DEVICE as DEVICE, requires_triton
from helpers import check_parity, make_problem, rel_err

triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
from fused_rnn.ops import self_check, triton_persistent  # noqa: E402

pytestmark = requires_triton


@pytest.fixture
def checked(monkeypatch):
    """The self-check on for this device, nothing checked yet; counts the checks run."""
    monkeypatch.setattr(self_check, "CHECKED_DEVICES", ("cuda", "cpu"))
    monkeypatch.delenv(self_check.ENV, raising=False)
    runs = []
    original = self_check.check

    def spy(choice, *args, **kwargs):
        runs.append(choice[0])
        return original(choice, *args, **kwargs)
    monkeypatch.setattr(self_check, "check", spy)
    self_check.reset()
    triton_rnn.reset_persistent_state()
    yield runs
    self_check.reset()
    triton_rnn.reset_persistent_state()


class Corrupted:
    """Stands in for a Triton kernel (``kernel[grid](*args)``): runs it, then adds ``delta`` to
    its output argument ``args[out]`` where ``rows`` (an index) says: a kernel that is wrong in a
    way the interpreter would not show. Counts its launches."""

    def __init__(self, kernel, out, rows, delta=1e-2):
        self.kernel, self.out, self.rows, self.delta, self.launches = kernel, out, rows, delta, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            self.kernel[grid](*args, **kwargs)
            args[self.out][self.rows] += self.delta
        return launch


def corrupt_persistent_fwd(monkeypatch):
    """The persistent forward writes a wrong last state; returns its launch counter."""
    calls = []
    original = triton_persistent.persistent_fwd

    def wrong(proj, ids, w_h, b_h, ws, *args, **kwargs):
        calls.append(1)
        original(proj, ids, w_h, b_h, ws, *args, **kwargs)
        ws[:, -1] += 1e-2
    monkeypatch.setattr(triton_persistent, "persistent_fwd", wrong)
    return calls


def test_correct_kernels_pass_once_per_path(checked, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    with warnings.catch_warnings():
        warnings.simplefilter("error", self_check.SelfCheckWarning)
        check_parity(make_problem(5, 3, 20, device=DEVICE), torch.float32, "triton")
        check_parity(make_problem(9, 4, 24, device=DEVICE, seed=1), torch.float32, "triton")
    assert checked == ["persistent"]  # one check for the path, none per call
    check_parity(make_problem(5, 3, 20, tokens=False, device=DEVICE), torch.float32, "triton")
    assert checked == ["persistent", "persistent"]  # dense input compiles other kernels: a new path
    note = fr.backends()["triton"].note
    assert "self-check: persistent course-cell float32 H_PAD=32 H%16>0 tokens bias" in note
    assert "FAILED" not in note


def test_wrong_persistent_kernel_falls_back_to_blocked(checked, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    calls = corrupt_persistent_fwd(monkeypatch)
    args = make_problem(6, 3, 20, device=DEVICE)
    with pytest.warns(self_check.SelfCheckWarning, match="self-check failed for persistent course-cell "
                      "float32 H_PAD=32 .* output relative error"):
        check_parity(args, torch.float32, "triton")  # right: the blocked kernels answered
    assert checked == ["persistent", "blocked"] and len(calls) == 1  # only the check ran it
    with warnings.catch_warnings():
        warnings.simplefilter("error", self_check.SelfCheckWarning)  # no second warning
        check_parity(args, torch.float32, "triton")
    assert checked == ["persistent", "blocked"] and len(calls) == 1
    note = fr.backends()["triton"].note
    assert "persistent course-cell float32" in note and "FAILED (output relative error" in note
    assert "blocked course-cell float32" in note and ": passed" in note


def test_wrong_blocked_kernels_fall_back_to_the_loop(checked, monkeypatch):
    """The persistent path not selected; the blocked backward kernel is wrong in its first
    batch row: the plain loop answers, forward and every gradient right."""
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "blocked")
    wrong = Corrupted(triton_rnn.rnn_bwd_kernel, out=3, rows=(0, slice(0, -1)))
    monkeypatch.setattr(triton_rnn, "rnn_bwd_kernel", wrong)
    args = make_problem(5, 4, 24, device=DEVICE)
    with pytest.warns(self_check.SelfCheckWarning, match="blocked course-cell float32 H_PAD=32 "
                      r"H%16>0 tokens bias tiles=\S+: grad_proj relative error"):
        check_parity(args, torch.float32, "triton")
    assert checked == ["blocked"] and wrong.launches == 1  # only in the check
    assert "blocked course-cell" in fr.backends()["triton"].note


def test_both_families_wrong_the_loop_answers(checked, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    corrupt_persistent_fwd(monkeypatch)
    monkeypatch.setattr(triton_rnn, "rnn_fwd_kernel",
                        Corrupted(triton_rnn.rnn_fwd_kernel, out=4, rows=(slice(None), -1)))
    args = make_problem(7, 3, 17, tokens=False, h0=False, device=DEVICE)
    with pytest.warns(self_check.SelfCheckWarning) as caught:
        check_parity(args, torch.float32, "triton")
    messages = [str(w.message) for w in caught if w.category is self_check.SelfCheckWarning]
    assert len(messages) == 2
    assert "for persistent" in messages[0] and "for blocked" in messages[1]
    assert checked == ["persistent", "blocked"]


def test_a_kernel_that_raises_fails_its_check(checked, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")
    monkeypatch.setattr(triton_persistent, "persistent_bwd", broken)
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    # (on a GPU the persistent launcher catches the error first: "launch failed (RuntimeError: ...)",
    # with its own warning that the blocked kernels run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", triton_rnn.PersistentKernelWarning)
        with pytest.warns(self_check.SelfCheckWarning, match="RuntimeError: out of resources"):
            check_parity(make_problem(4, 2, 16, device=DEVICE), torch.float32, "triton")


def test_tf32_path_is_checked_with_its_tolerance(checked, monkeypatch):
    """The check's tolerance follows the precision the kernels run in (a path's dtype)."""
    assert self_check.TOLERANCE["tf32"] > self_check.TOLERANCE["float32"]
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "blocked")
    args = make_problem(4, 3, 16, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", self_check.SelfCheckWarning)
        out = fr.fused_rnn(**args, backend="triton", allow_tf32=True)[0]
    assert checked == ["blocked"]
    assert "blocked course-cell tf32 H_PAD=16 H%16=0" in fr.backends()["triton"].note
    assert rel_err(out, fr.rnn_reference(**args)[0]) < 1e-2


def test_switched_off_by_the_environment(checked, monkeypatch):
    """FUSED_RNN_SELF_CHECK=0: no check, so an injected wrong kernel answers (what the check is
    there to prevent)."""
    monkeypatch.setenv(self_check.ENV, "0")
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    corrupt_persistent_fwd(monkeypatch)
    args = make_problem(6, 3, 20, device=DEVICE)
    with pytest.raises(AssertionError, match="relative error"):
        check_parity(args, torch.float32, "triton")
    assert checked == []


@pytest.mark.skipif(DEVICE == "cuda", reason="the default (CUDA only) is seen on a CPU machine")
def test_off_by_default_for_the_interpreter(monkeypatch):
    self_check.reset()
    triton_rnn.reset_persistent_state()
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "persistent")
    calls = corrupt_persistent_fwd(monkeypatch)
    out = fr.fused_rnn(**make_problem(3, 2, 8, device=DEVICE), backend="triton")[0]
    assert len(calls) == 1 and out.shape == (3, 2, 8) and self_check.summary() == ""
