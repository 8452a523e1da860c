"""The C++ extension: its build paths (setup.py, or just in time on first use), thread-count
independence, and both token-gradient paths (fp32 accuracy where tanh saturates: test_parity.py)."""
import os
import subprocess
import sys
import time

import pytest
import torch

import fused_rnn
from helpers import check_parity, make_problem, rel_err
from fused_rnn.ops import cpu_ext

JIT_CHECK = """
import sys
sys.modules["fused_rnn._C"] = None  # as if setup.py had not built the extension
import pytest
import torch
import fused_rnn
from fused_rnn.ops import cpu_ext
ext = cpu_ext.load()
assert ext.__name__ == "fused_rnn_cpu", ext
x = torch.randint(0, 5, (3, 4))
args = (torch.randn(6, 2), None, torch.randn(6, 6) * 0.3, torch.randn(6))
emb = torch.randn(5, 2)
got = fused_rnn.fused_rnn(x, *args, embedding=emb, backend="cpu")[0]
torch.testing.assert_close(got, fused_rnn.rnn_reference(x, *args, embedding=emb)[0])
print("jit ok")
"""


def test_installed_build_is_used():
    assert cpu_ext.load().__name__ == "fused_rnn._C"
    assert fused_rnn.backends()["cpu"].available


@pytest.mark.exhaustive
def test_just_in_time_build_when_not_built_at_install(tmp_path):
    """The one-line "building" message appears when it really builds, and not when it loads the
    cached build (the second run)."""
    for run in range(2):
        builds = not cpu_ext._cached_build_is_current()
        assert not (builds and run == 1)  # the first run left a current build
        out = subprocess.run([sys.executable, "-c", JIT_CHECK], capture_output=True, text=True, timeout=900)
        assert out.returncode == 0 and "jit ok" in out.stdout, out.stdout + out.stderr
        assert ("building the CPU extension" in out.stderr) == builds, out.stderr


def test_parallel_results_do_not_depend_on_thread_count():
    """Rows are split across threads; any split must give the same numbers (to rounding: BLAS
    may block the GEMMs differently for another thread count)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (37, 11), generator=g)
    args = [torch.randn(*s, generator=g) * 0.3 for s in [(24, 5), (24,), (24, 24), (24,)]]
    emb = torch.randn(9, 5, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(fused_rnn.fused_rnn(x, *args, embedding=emb, backend="cpu")[0])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("V, B, T", [(5, 40, 3), (300, 3, 4)], ids=["per-block-tables", "index-add"])
def test_token_gradient_both_accumulation_paths(V, B, T):
    """The token table's gradient is summed per block of rows when the tables are small, with
    index_add_ otherwise; both must match the reference."""
    args = make_problem(B, T, 24, V=V, seed=V)
    check_parity(args, torch.float32, "cpu")


@pytest.mark.parametrize("T", [1, 2, 5])
def test_first_steps_from_tables(T):
    """With token input, no h0 and V <= B / 2 the first two steps come from [V, H] tables."""
    args = make_problem(40, T, 24, V=7, h0=False, seed=T)
    check_parity(args, torch.float32, "cpu")


@pytest.mark.parametrize("panels", [True, False], ids=["panels", "mm"])
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
def test_weight_gradient_over_chunks_of_steps(tokens, h0, panels):
    """On at::mm the backward sums the weight gradient per chunk of steps (8192 rows): B=1000, T=10
    makes chunks of 9 steps and 1 step; on the panel products it is one product over every step,
    after the loop over 9 blocks of 112 rows. With token input the states' share reads the states
    in place (step t multiplies h_t: h0, or nothing without it, for t = 0)."""
    args = make_problem(1000, 10, 16, tokens=tokens, h0=h0, seed=7)
    with cpu_ext.panel_products(panels):
        check_parity(args, torch.float32, "cpu")


BUILT = object()  # what the stand-in builder returns


@pytest.fixture
def jit_build(tmp_path, monkeypatch):
    """``cpu_ext._load`` as if setup.py had not built the extension, with its build folder in
    ``tmp_path`` and a builder that records its calls instead of compiling."""
    import torch.utils.cpp_extension

    monkeypatch.delattr(fused_rnn, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "fused_rnn._C", None)
    monkeypatch.setattr(cpu_ext, "_build_directory", lambda: tmp_path)
    monkeypatch.setattr(cpu_ext, "_ext", None)
    calls = []

    def build(**kwargs):
        assert not (tmp_path / "lock").exists()  # else torch would wait on it
        calls.append(kwargs)
        return BUILT

    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    return tmp_path, calls


def test_a_lock_left_by_a_stopped_build_is_removed(jit_build, capsys):
    folder, calls = jit_build
    (folder / "lock").touch()  # torch's, left by a build killed midway: no builder holds the flock
    assert cpu_ext.load() is BUILT
    assert [c["build_directory"] for c in calls] == [str(folder)]
    assert "removed" in capsys.readouterr().err


def test_a_running_build_is_waited_for(jit_build, capsys):
    import fcntl
    import threading

    folder, calls = jit_build
    (folder / "lock").touch()
    with open(folder / "fused_rnn_build.flock", "a") as other:  # another process's build, running
        fcntl.flock(other, fcntl.LOCK_EX)

        def finish():
            (folder / "lock").unlink()
            fcntl.flock(other, fcntl.LOCK_UN)

        timer = threading.Timer(0.3, finish)
        timer.start()
        assert cpu_ext.load() is BUILT
        timer.join()
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert "waiting for another process" in err and "removed" not in err


def test_a_stale_lock_that_cannot_be_removed_is_one_line(jit_build, monkeypatch):
    folder, calls = jit_build
    (folder / "lock").touch()

    def unlink(self, missing_ok=False):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(folder), "unlink", unlink)
    with pytest.raises(RuntimeError, match="blocked by .*lock.*delete that file") as info:
        cpu_ext.load()
    assert "\n" not in str(info.value) and str(folder / "lock") in str(info.value) and not calls


def test_without_flock_an_old_lock_is_one_line_and_a_young_one_waited_for(jit_build, monkeypatch):
    folder, calls = jit_build
    monkeypatch.setattr(cpu_ext, "fcntl", None)
    lock = folder / "lock"
    lock.touch()
    old = time.time() - cpu_ext.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.raises(RuntimeError, match="blocked by .*delete that file") as info:
        cpu_ext.load()
    assert "\n" not in str(info.value) and str(lock) in str(info.value) and not calls

    os.utime(lock)  # young: a build may be running; here it ends
    monkeypatch.setattr(cpu_ext, "_ext", None)
    monkeypatch.setattr(cpu_ext.time, "sleep", lambda s: lock.unlink())
    assert cpu_ext.load() is BUILT and len(calls) == 1


def _panels_here():
    return cpu_ext.unavailable_reason() is None and cpu_ext.load().panel_products_here()


def _elman_problem(B, T, H, h0, seed=0):
    g = torch.Generator().manual_seed(seed)
    I = 9

    def rand(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).float().requires_grad_()

    return dict(x=rand(B, T, I), w_ih=rand(H, I, scale=I ** -0.5), w_hh=rand(H, H, scale=1.5 * H ** -0.5),
                b_ih=rand(H, scale=0.3), b_hh=rand(H, scale=0.3), h0=rand(B, H, scale=0.9) if h0 else None)


# name -> (function, reference, problem maker (B, T, H, h0))
VANILLA_CELLS = {
    "course-tokens": (fused_rnn.fused_rnn, fused_rnn.rnn_reference, lambda B, T, H, h0: make_problem(B, T, H, h0=h0)),
    "course-dense": (fused_rnn.fused_rnn, fused_rnn.rnn_reference,
                     lambda B, T, H, h0: make_problem(B, T, H, h0=h0, tokens=False)),
    "elman_tanh": (fused_rnn.elman_rnn, fused_rnn.elman_reference, _elman_problem),
    "elman_relu": (lambda **a: fused_rnn.elman_rnn(**a, nonlinearity="relu"),
                   lambda **a: fused_rnn.elman_reference(**a, nonlinearity="relu"), _elman_problem),
}


@pytest.mark.skipif(not _panels_here(), reason="the panel products need the C++ extension on a CPU with AVX-512")
@pytest.mark.parametrize("cell", list(VANILLA_CELLS))
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zeros"])
def test_panel_products_and_step_products_match_the_reference(cell, h0):
    """The one-gate cells' float32 forward and backward with the AVX-512 panel products and with
    the per-step GEMMs, each within fp32 rounding of the float64 reference: H = 70 (two 64-column
    panels, the last padded), 23 rows (uneven kernel calls). The panel forward's and (the elman
    cells) backward's bits do not depend on the thread count (the course cell's input table comes
    from torch's own GEMM, whose bits may: there, to rounding)."""
    function, reference, problem = VANILLA_CELLS[cell]
    args = problem(23, 5, 70, h0)
    for on in (True, False):
        with cpu_ext.panel_products(on):
            check_parity(args, torch.float32, "cpu", function, reference)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items()
                      if torch.is_tensor(v) and v.is_floating_point()}
            out = function(**{**args, **leaves}, backend="cpu")[0]
            weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
            results.append([out, *torch.autograd.grad((out * weights).sum(), list(leaves.values()))])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        if cell.startswith("elman"):
            assert torch.equal(one, two)
        else:
            assert rel_err(one, two) < 1e-5


@pytest.mark.skipif(not _panels_here(), reason="the panel products need the C++ extension on a CPU with AVX-512")
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zeros"])
@pytest.mark.parametrize("tokens", ["table", "inside", "dense"])
def test_course_extension_bits_do_not_depend_on_the_thread_count(tokens, h0):
    """The course cell's C++ forward and backward on the panel products: each fixed block of rows
    runs all its steps with its own partial sums (bias, token tables), so one thread and two give
    the same bits: 40 rows (blocks of 16, the last short), token input (the [V, H] table given, or
    formed inside from the embedding) and the dense input's per-step rows, with and without h0
    (without it and with tokens the first two steps come from tables). grad_U's last product is
    torch's GEMM, and the embedding's, w_in's and b_in's gradients follow from it: to rounding there."""
    ext = cpu_ext.load()
    g = torch.Generator().manual_seed(11)
    B, T, H, V, E = 40, 6, 70, 7, 5
    if tokens == "dense":
        proj, ids, inside = torch.randn(B, T, H, generator=g), None, ()
    else:
        ids = torch.randint(0, V, (B, T), generator=g)
        if tokens == "table":
            proj, inside = torch.randn(V, H, generator=g), ()
        else:
            proj, inside = torch.randn(V, E, generator=g), (torch.randn(H, E, generator=g), torch.randn(H, generator=g))
    w_h, b_h = torch.randn(H, H, generator=g) * H ** -0.5, torch.randn(H, generator=g) * 0.1
    start = torch.randn(B, H, generator=g) * 0.5 if h0 else None
    grad_out, grad_h_n = torch.randn(B, T, H, generator=g), torch.randn(B, H, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            states = ext.rnn_fwd(proj, ids, w_h, b_h, start, "course", *inside)
            grads = ext.rnn_bwd(grad_out, grad_h_n, states, start, proj, ids, w_h, True, "course", *inside)
            results.append([states, *grads])
    finally:
        torch.set_num_threads(threads)
    from_grad_u = {"table": {1}, "inside": {1, 5, 6}, "dense": set()}[tokens]  # grad_U / grad_E, grad_w_in, grad_b_in
    for i, (one, two) in enumerate(zip(*results)):
        if one is None or two is None:
            assert one is two, i
        elif i in from_grad_u:
            assert rel_err(one, two) < 1e-6, i
        else:
            assert torch.equal(one, two), i


X_LAYOUTS = {  # x [B, T, I] as a batch-first tensor, a view of a time-major one, rows of stride 2
    "batch-first": lambda x: x.clone(),
    "time-major": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
    "strided-rows": lambda x: torch.stack([x, x], dim=-1)[..., 0],
}


@pytest.mark.parametrize("layout", list(X_LAYOUTS))
def test_elman_input_projection_inside_the_loop_reads_x_where_it_lies(layout):
    """On the cpu backend the elman cells form q = x W_ih^T + b inside the time loop, reading x in
    place: every layout gives the contiguous input's bits, forward and every gradient."""
    args = _elman_problem(11, 6, 70, h0=True)
    results = []
    for make in (X_LAYOUTS["batch-first"], X_LAYOUTS[layout]):
        leaves = {k: (make(v) if k == "x" else v).detach().requires_grad_() for k, v in args.items()}
        out, h_n = fused_rnn.elman_rnn(**leaves, backend="cpu")
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        results.append([out, h_n, *torch.autograd.grad((out * weights).sum() + h_n.sum(), list(leaves.values()))])
    for one, two in zip(*results):
        assert torch.equal(one, two)


def _elman_input_args():
    return dict(proj=torch.zeros(3, 4, 5), ids=None, w_h=torch.zeros(8, 8), b_h=torch.zeros(8), h0=None,
                cell="elman_tanh", w_in=torch.zeros(8, 5))


ELMAN_INPUT_ERRORS = {
    "course-cell": (ValueError, dict(cell="course")),
    "ids": (ValueError, dict(ids=torch.zeros(3, 4, dtype=torch.long))),
    "x-not-3d": (ValueError, dict(proj=torch.zeros(12, 5))),
    "x-empty": (ValueError, dict(proj=torch.zeros(3, 0, 5))),
    "w_in-shape": (ValueError, dict(w_in=torch.zeros(8, 4))),
    "w_in-dtype": (TypeError, dict(w_in=torch.zeros(8, 5, dtype=torch.float64))),
    "b_h-shape": (ValueError, dict(b_h=torch.zeros(7))),
}


@pytest.mark.parametrize("case", ELMAN_INPUT_ERRORS, ids=list(ELMAN_INPUT_ERRORS))
def test_elman_input_projection_checks_its_inputs(case):
    """rnn_fwd and rnn_bwd with w_in check what they are given, with torch's error classes."""
    error, change = ELMAN_INPUT_ERRORS[case]
    ext = cpu_ext.load()
    args = {**_elman_input_args(), **change}
    with pytest.raises(error):
        ext.rnn_fwd(**args)
    if "b_h" in change:  # rnn_bwd takes no b_h
        return
    states = ext.rnn_fwd(**_elman_input_args())
    T, B, H = states.shape
    with pytest.raises(error):
        ext.rnn_bwd(torch.zeros(B, T, H), torch.zeros(B, H), states, None, args["proj"], args["ids"], args["w_h"],
                    True, args["cell"], args["w_in"])


def _token_input_args():
    return dict(proj=torch.zeros(6, 5), ids=torch.zeros(3, 4, dtype=torch.long), w_h=torch.zeros(8, 8),
                b_h=torch.zeros(8), h0=None, cell="course", w_in=torch.zeros(8, 5), b_in=torch.zeros(8))


TOKEN_INPUT_ERRORS = {
    "elman-cell": (ValueError, dict(cell="elman_tanh", b_h=None)),
    "b_in-without-w_in": (ValueError, dict(w_in=None)),
    "ids-out-of-range": (IndexError, dict(ids=torch.full((3, 4), 6, dtype=torch.long))),
    "negative-id": (IndexError, dict(ids=torch.full((3, 4), -1, dtype=torch.long))),
    "ids-dtype": (TypeError, dict(ids=torch.zeros(3, 4, dtype=torch.int32))),
    "embedding-not-2d": (ValueError, dict(proj=torch.zeros(6, 5, 1))),
    "embedding-dtype": (TypeError, dict(proj=torch.zeros(6, 5, dtype=torch.float64))),
    "w_in-shape": (ValueError, dict(w_in=torch.zeros(8, 4))),
    "b_in-shape": (ValueError, dict(b_in=torch.zeros(7))),
}


@pytest.mark.parametrize("case", TOKEN_INPUT_ERRORS, ids=list(TOKEN_INPUT_ERRORS))
def test_course_token_projection_checks_its_inputs(case):
    """rnn_fwd and rnn_bwd given the embedding, ids, w_in and b_in (the course's [V, H] table formed
    inside) check what they are given, with torch's error classes."""
    error, change = TOKEN_INPUT_ERRORS[case]
    ext = cpu_ext.load()
    args = {**_token_input_args(), **change}
    with pytest.raises(error):
        ext.rnn_fwd(**args)
    states = ext.rnn_fwd(**_token_input_args())
    T, B, H = states.shape
    with pytest.raises(error):
        ext.rnn_bwd(torch.zeros(B, T, H), torch.zeros(B, H), states, None, args["proj"], args["ids"], args["w_h"],
                    args["b_h"] is not None, args["cell"], args["w_in"], args["b_in"])


def test_large_buffers_are_reused_and_released():
    """The extension's large per-call tensors come from its buffer cache: a freed one is kept
    (no page faults on the next call of the same size), handed out again with stale contents that
    every kernel overwrites, and release_cached_buffers() frees them."""
    ext = cpu_ext.load()
    ext.release_cached_buffers()
    g = torch.Generator().manual_seed(0)
    T, B, H = 16, 32, 256  # out [T, B, H] is 512 KB; saved [T, B, 4H] 2 MB: cached
    w = torch.randn(4 * H, H, generator=g) * H ** -0.5

    def run(seed):
        q = torch.randn(T, B, 4 * H, generator=torch.Generator().manual_seed(seed))
        return [t.clone() for t in cpu_ext.gated_fwd(q, w, None, None, None, None)], q

    first, _ = run(1)
    assert ext.cached_buffer_bytes() >= T * B * 4 * H * 4  # saved went back when its tensor was freed
    second, q = run(2)  # takes the stale buffer
    want = cpu_ext.gated_fwd(q.double(), w.double(), None, None, None, None)
    for got, expected in zip(second, want):
        assert rel_err(got, expected) < 1e-5
    assert not torch.equal(first[2], second[2])
    out = cpu_ext.gated_fwd(q, w, None, None, None, None)[2]  # a user may resize what they get
    out.resize_(T + 1, B, 4 * H)
    out[-1] = 1.0
    assert ext.release_cached_buffers() > 0 and ext.cached_buffer_bytes() == 0


@pytest.mark.skipif(not _panels_here(), reason="the panel products need the C++ extension on a CPU with AVX-512")
def test_product_timing_counts_only_while_on():
    """benchmarks/product_rate.py's tick count: nothing while off, the panel tiles' ticks while on,
    and each call hands over what it counted and starts again from zero."""
    ext = cpu_ext.load()
    q, w = torch.randn(4, 8, 4 * 16), torch.randn(4 * 16, 16)

    def run():
        ext.gated_fwd(q, w, None, torch.zeros(8, 16), None, None, "lstm", True)

    ext.time_products(False)
    run()
    assert ext.time_products(False) == 0
    ext.time_products(True)
    run()
    assert ext.time_products(False) > 0
    run()
    assert ext.time_products(False) == 0


def test_float_tanh_is_correctly_rounded_but_in_rare_cases():
    """The extension's float tanh (the course's and nn.RNN's cells, AVX-512 or portable): against
    fp64's tanh rounded once, 2M inputs over [-10, 10] (dense near 0, where a float formula would
    lose the most) and the specials: almost all correctly rounded, none off by more than 0.53 ulp,
    NaN kept, +-inf to +-1. Read through the elman forward's first step without h0 (h_1 = tanh(q_1))."""
    g = torch.Generator().manual_seed(5)
    wide = torch.rand(1 << 20, generator=g) * 20 - 10
    near_zero = torch.randn(1 << 20, generator=g) * torch.exp2(-torch.rand(1 << 20, generator=g) * 30)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 9.5, -9.5, 0.2, -0.2, 1e-30, 1e-45])
    q = torch.cat([wide, near_zero, specials])
    H = 1024
    q = torch.cat([q, q.new_zeros(-q.numel() % H)]).view(1, -1, H)  # [T=1, B, H]
    got = cpu_ext.load().rnn_fwd(q, None, torch.zeros(H, H), None, None, "elman_tanh")[0].flatten()
    want = torch.tanh(q.flatten().double())
    assert got[-H:].isnan().sum() == 1 and torch.isnan(got[q.flatten().isnan()]).all()
    finite = ~want.isnan()
    got, want = got[finite].double(), want[finite]
    rounded = want.float().double()
    ulp = (torch.nextafter(rounded.abs().float(), torch.tensor(2.0)).double() - rounded.abs()).clamp_min(2.0 ** -149)
    errors = ((got - want).abs() / ulp)
    assert (got != rounded).double().mean() < 1e-3
    assert errors.max() < 0.53
