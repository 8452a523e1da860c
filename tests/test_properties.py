"""Inputs never surprise: random problems against the float64 reference loop (hypothesis), NaN and
Inf, determinism, two threads at once, offsets past 2^31 elements."""
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_rnn import fused_rnn, rnn_reference
from conftest import backend_device
from helpers import TOLERANCE, cast, make_problem, rel_err, run_with_grads

# Examples per backend: the Triton interpreter runs ~50x slower than the C++ extension.
EXAMPLES = {"cpu": 150, "triton": 40}


def strided(t):
    """The same values in a non-contiguous tensor (every other element of a wider one)."""
    if t is None:
        return None
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]
    wide.copy_(t.detach())
    return wide.requires_grad_(t.requires_grad)


@st.composite
def problems(draw, device):
    B, T, H = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 12))
    E, V = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    tokens, bias, h0, padded, contiguous = (draw(st.booleans()) for _ in range(5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    args = make_problem(B, T, H, E=E, V=V, tokens=tokens, h0=h0, bias=bias, dtype=dtype, seed=seed,
                        device=device)
    if not contiguous:
        args = {k: strided(v) for k, v in args.items()}
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g).to(device) if padded else None
    return args, lengths


def reference(args, lengths):
    """The loop on each sequence alone, cut to its length, padded with zeros: what ``lengths``
    means, written independently of the library's masking."""
    if lengths is None:
        return rnn_reference(**args)
    T = args["x"].shape[1]
    outs, finals = [], []
    for b, L in enumerate(lengths.tolist()):
        row = dict(args, x=args["x"][b:b + 1, :L], h0=None if args["h0"] is None else args["h0"][b:b + 1])
        out, h_n = rnn_reference(**row)
        outs.append(F.pad(out, (0, 0, 0, T - L)))
        finals.append(h_n)
    return torch.cat(outs), torch.cat(finals)


@pytest.mark.exhaustive
@pytest.mark.parametrize("backend", list(EXAMPLES))
def test_random_problems_match_the_reference(backend):
    """Random B, T, H, E, V; tokens or dense; with/without biases and h0; padded lengths; fp32 or
    fp64; contiguous or not: the forward and every gradient match the float64 loop."""
    device = backend_device(backend)

    @settings(max_examples=EXAMPLES[backend], derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(problems(device))
    def check(problem):
        args, lengths = problem
        dtype = args["w_h"].dtype
        got = run_with_grads(lambda **a: fused_rnn(**a, lengths=lengths, backend=backend), args)
        want = run_with_grads(lambda **a: reference(a, lengths), cast(args, torch.float64))
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == dtype, name
            err = rel_err(got[name], want[name])
            assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"

    check()


# NaN and Inf: the fused backends must give what the reference loop gives: NaN where it has NaN,
# the same infinities, the same finite values. (x, h0, ... : which input gets the value; an
# infinite weight saturates tanh or relu, so its output stays finite, its gradients do not.)
NONFINITE = {
    "x-nan": ("x", float("nan"), False),
    "x-inf": ("x", float("inf"), False),
    "h0-nan": ("h0", float("nan"), False),
    "w_h-inf": ("w_h", float("inf"), False),
    "b_h-nan": ("b_h", float("nan"), True),
    "embedding-nan": ("embedding", float("nan"), True),
    "b_in-nan": ("b_in", float("nan"), True),
    "w_in-neg-inf": ("w_in", float("-inf"), True),
}
NONFINITE_PARAMS = [pytest.param(backend, case, id=f"{backend}-{case}") for backend in EXAMPLES for case in NONFINITE]


def nonfinite_problem(case, backend):
    name, value, tokens = NONFINITE[case]
    args = make_problem(3, 4, 5, E=3, V=4, tokens=tokens, seed=1, device=backend_device(backend))
    with torch.no_grad():
        args[name].view(-1)[1] = value
    return args


def assert_same_nonfinite(got, want):
    """NaN in the same places, the same infinities, finite values close (fp32 vs fp64)."""
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-5, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


# The interpreter's numpy matmul warns about inf - inf; that NaN is the point here.
interpreter_nan_warning = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@interpreter_nan_warning
@pytest.mark.parametrize("backend, case", NONFINITE_PARAMS)
def test_nan_and_inf_forward_like_the_reference(backend, case):
    args = nonfinite_problem(case, backend)
    with torch.no_grad():
        got = dict(zip(["output", "h_n"], fused_rnn(**args, backend=backend)))
        want = dict(zip(["output", "h_n"], rnn_reference(**cast(args, torch.float64))))
    assert_same_nonfinite(got, want)


@interpreter_nan_warning
@pytest.mark.parametrize("backend, case", NONFINITE_PARAMS)
def test_nan_and_inf_gradients_like_the_reference(backend, case):
    args = nonfinite_problem(case, backend)
    got = run_with_grads(lambda **a: fused_rnn(**a, backend=backend), args)
    want = run_with_grads(rnn_reference, cast(args, torch.float64))
    assert_same_nonfinite(got, want)


DETERMINISM = {"cpu": dict(B=64, T=24, H=96, E=16, V=20), "triton": dict(B=5, T=6, H=20, E=6, V=11),
               "reference": dict(B=16, T=12, H=48, E=8, V=13)}


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
@pytest.mark.parametrize("backend", list(DETERMINISM))
def test_deterministic_algorithms_give_bitwise_repeatable_results(backend, tokens):
    shape = DETERMINISM[backend]
    args = make_problem(shape["B"], shape["T"], shape["H"], E=shape["E"], V=shape["V"], tokens=tokens, seed=3,
                        device=backend_device(backend))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_with_grads(lambda **a: fused_rnn(**a, backend=backend), args) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        for name in runs[0]:
            assert torch.equal(run[name], runs[0][name]), name


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_two_threads_at_once_get_correct_results(backend):
    problems_ = [make_problem(16, 20, 48, E=8, V=13, tokens=i == 0, seed=10 + i) for i in range(2)]
    wants = [run_with_grads(rnn_reference, cast(p, torch.float64)) for p in problems_]
    errors, start = [], threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            for _ in range(5):
                got = run_with_grads(lambda **a: fused_rnn(**a, backend=backend), problems_[i])
                for name, want in wants[i].items():
                    err = rel_err(got[name], want)
                    assert err < TOLERANCE[torch.float32], f"thread {i}, {name}: relative error {err:.2e}"
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors


def mem_available_gib():
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


# B*(T+1)*H = 2^31 + 17*16*64 elements of fp32 state (8 GiB; token input, so nothing else is that
# big). H=64 rather than 16: the same offsets at a third of the time (short rows cost per row).
LARGE = dict(B=2**21 + 17, T=15, H=64)
LARGE_CHECK = f"""
import torch
from fused_rnn import fused_rnn, rnn_reference
B, T, H = {LARGE['B']}, {LARGE['T']}, {LARGE['H']}
g = torch.Generator().manual_seed(0)
emb, w_in, b_in = torch.randn(5, 3, generator=g), torch.randn(H, 3, generator=g) / 2, torch.randn(H, generator=g) / 2
w_h, b_h = torch.randn(H, H, generator=g) / H ** 0.5, torch.randn(H, generator=g) / 2
x = torch.randint(0, 5, (B, T), generator=g)
out, h_n = fused_rnn(x, w_in, b_in, w_h, b_h, embedding=emb, backend="cpu")
assert out.shape == (B, T, H)
for rows in (slice(0, 2), slice(B - 3, B)):  # rows are independent: check the first and the last
    want_out, want_h = rnn_reference(x[rows], w_in, b_in, w_h, b_h, embedding=emb)
    torch.testing.assert_close(out[rows], want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_n[rows], want_h, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.exhaustive
@pytest.mark.large_memory
@pytest.mark.skipif(mem_available_gib() < 12, reason=f"needs 12 GiB of free memory, {mem_available_gib():.1f} available")
def test_offsets_past_2_to_the_31_elements_cpu():
    """The C++ forward on a state tensor of more than 2^31 elements: the last batch rows, whose
    offsets do not fit an int32, match the reference. In a subprocess, so a crash is a failure."""
    B, T, H = LARGE["B"], LARGE["T"], LARGE["H"]
    assert B * (T + 1) * H > 2**31
    out = subprocess.run([sys.executable, "-c", LARGE_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
