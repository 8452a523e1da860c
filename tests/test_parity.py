"""The fused backends against the plain PyTorch reference: forward and every gradient."""
import pytest
import torch

from fused_rnn import fused_rnn, rnn_reference
from helpers import TOLERANCE, cast, check_parity, make_problem, rel_err, run_with_grads
from conftest import backend_device, requires_cuda, requires_triton, tiered

# Odd sizes beside round ones; H=130/200 take more than one column block in every mode, B=70
# more than one batch block.
SHAPES = [(1, 1, 1), (1, 7, 16), (5, 7, 48), (5, 40, 100), (33, 7, 16), (33, 40, 48), (5, 1, 100),
          (70, 7, 130), (3, 5, 200)]


def shape_id(shape):
    B, T, H = shape
    return f"B{B}-T{T}-H{H}"


@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zero-h0"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
@pytest.mark.parametrize("shape", tiered(SHAPES, fast={(1, 1, 1), (70, 7, 130)}, ids=shape_id))
def test_fp32_matches_reference(shape, tokens, h0, kernel):
    B, T, H = shape
    args = make_problem(B, T, H, tokens=tokens, h0=h0, device=kernel.device, seed=B * 1000 + T * 10 + H)
    check_parity(args, torch.float32, kernel.backend)


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
def test_without_biases(tokens, kernel):
    args = make_problem(4, 6, 24, tokens=tokens, bias=False, device=kernel.device)
    check_parity(args, torch.float32, kernel.backend)


def test_fp64_matches_reference(kernel):
    args = make_problem(5, 9, 40, dtype=torch.float64, device=kernel.device)
    check_parity(args, torch.float64, kernel.backend)


@pytest.mark.parametrize("fast_mode", tiered([True, False], fast={True}), ids=["fast", "full"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
def test_gradcheck_fp64(tokens, fast_mode, kernel):
    args = make_problem(3, 4, 5, E=3, V=4, tokens=tokens, dtype=torch.float64, device=kernel.device)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return fused_rnn(**{**args, **dict(zip(names, tensors))}, backend=kernel.backend)

    assert torch.autograd.gradcheck(fn, [args[k] for k in names], fast_mode=fast_mode)


def test_non_contiguous_inputs(kernel):
    args = make_problem(5, 7, 20, tokens=False, device=kernel.device)
    strided = {
        "x": args["x"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(),
        "w_in": args["w_in"].detach().t().contiguous().t().requires_grad_(),
        "w_h": args["w_h"].detach().t().contiguous().t().requires_grad_(),
        "h0": args["h0"].detach().t().contiguous().t().requires_grad_(),
    }
    assert not any(v.is_contiguous() for v in strided.values())
    check_parity({**args, **strided}, torch.float32, kernel.backend)


def test_token_ids_of_any_integer_dtype(kernel):
    args = make_problem(3, 4, 8, device=kernel.device)
    want = fused_rnn(**args, backend=kernel.backend)[0]
    got = fused_rnn(**{**args, "x": args["x"].to(torch.int32)}, backend=kernel.backend)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_h_n_used(kernel):
    """Backward with no gradient arriving through `output`."""
    args = make_problem(4, 6, 12, device=kernel.device)
    got = torch.autograd.grad(fused_rnn(**args, backend=kernel.backend)[1].sum(), [args["w_h"], args["h0"]])
    want = torch.autograd.grad(rnn_reference(**args)[1].sum(), [args["w_h"], args["h0"]])
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(5, 40, 100), (64, 64, 256)], ids=shape_id)
def test_half_precision_matches_reference(shape, dtype):
    check_parity(make_problem(*shape, dtype=dtype, device="cuda"), dtype, "triton")


@requires_cuda
@pytest.mark.parametrize("H", [256, 384, 512, 1000, 1024])
def test_large_hidden_sizes(H):
    check_parity(make_problem(7, 24, H, E=32, device="cuda"), torch.float32, "triton")


@requires_cuda
def test_tf32_is_opt_in_and_close():
    """TF32 must change the result (beyond fp32 rounding, so the switch is not ignored) and stay
    within TF32's error, forward and every gradient."""
    args = make_problem(16, 32, 256, device="cuda")
    exact = run_with_grads(lambda **a: fused_rnn(**a, backend="triton"), args)
    tf32 = run_with_grads(lambda **a: fused_rnn(**a, backend="triton", allow_tf32=True), args)
    for name in exact:
        err = rel_err(tf32[name], exact[name])
        assert TOLERANCE[torch.float32] < err < 1e-2, f"{name}: TF32 vs IEEE relative error {err:.1e}"


@requires_triton
def test_allow_tf32_reaches_the_kernels(monkeypatch):
    """The interpreter ignores input_precision, so here the switch is checked where it enters the
    kernels: every dot of the forward and backward chain is told "tf32" (and "ieee" without it).
    (On a GPU the first use of a path also runs its self-check, with the same precision: more
    launches, the same kernels and precisions.)"""
    triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
    seen = []
    for name in ("rnn_fwd_kernel", "rnn_bwd_kernel"):
        kernel = getattr(triton_rnn, name)

        class Spy:
            def __getitem__(self, grid, _kernel=kernel, _name=name):
                def launch(*args, **kwargs):
                    seen.append((_name, kwargs["DOT_PRECISION"]))
                    return _kernel[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(triton_rnn, name, Spy())
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "blocked")
    args = make_problem(3, 2, 8, device=backend_device("triton"))
    for allow_tf32, precision in ((True, "tf32"), (False, "ieee")):
        seen.clear()
        run_with_grads(lambda **a: fused_rnn(**a, backend="triton", allow_tf32=allow_tf32), args)
        assert set(seen) == {("rnn_fwd_kernel", precision), ("rnn_bwd_kernel", precision)}, seen


@requires_triton
@pytest.mark.parametrize("shape", tiered([(33, 5, 100), (5, 3, 130), (17, 2, 64), (2, 3, 7)],
                                          fast={(33, 5, 100)}, ids=shape_id))
def test_blocked_kernels_with_the_gpu_tiling(shape, monkeypatch):
    """The interpreter picks its own (larger) blocks for speed; here the blocked kernels run the
    exact tiles a GPU runs (16 rows x 64 columns x 64 K: several row, column and K blocks, ragged
    last ones), forward and every gradient against the reference."""
    triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
    gpu_sizes = triton_rnn.blocked_block_sizes
    used = []

    def as_on_a_gpu(B, H, interpret=None):
        used.append(gpu_sizes(B, H, interpret=False))
        return used[-1]
    monkeypatch.setattr(triton_rnn, "blocked_block_sizes", as_on_a_gpu)
    monkeypatch.setenv("FUSED_RNN_TRITON_KERNEL", "blocked")
    B, T, H = shape
    for tokens in (True, False):
        check_parity(make_problem(B, T, H, tokens=tokens, device=backend_device("triton"), seed=H),
                     torch.float32, "triton")
    assert used and all(sizes == (16, min(64, max(16, triton_rnn.triton.next_power_of_2(H))),
                                  min(64, max(16, triton_rnn.triton.next_power_of_2(H)))) for sizes in used)


def _errors(args, lengths, backend):
    """Relative error of every output and gradient of ``backend`` in fp32 against fp64."""
    def run(a, dtype, backend):
        return run_with_grads(lambda **kw: fused_rnn(**kw, lengths=lengths, backend=backend), cast(a, dtype))

    want = run(args, torch.float64, "reference")
    got = run(args, torch.float32, backend)
    return {k: rel_err(got[k], want[k]) for k in want}


# Random problems per backend (the interpreter is ~50x slower than the C++ extension).
SATURATED_CASES = {"cpu": 150, "triton": 40}


def test_fp32_error_near_the_eager_loop_on_saturated_states(kernel):
    """Where tanh saturates, 1 - h^2 amplifies any error in h: on random small problems with
    saturated states, every fp32 output and gradient of each fused backend stays within 8x of the
    eager fp32 loop's own error (floor 1e-5). (The rational tanh of v0.1 broke this by up to 100x.)"""
    worst = []
    for case in range(SATURATED_CASES[kernel.backend]):
        g = torch.Generator().manual_seed(case)
        B, T, H = [int(v) for v in torch.randint(1, 9, (3,), generator=g)]
        if case == 0:
            B, T, H = 4, 5, 1  # dense input, padded lengths: 20x off with the rational tanh
        args = make_problem(B, T, H, tokens=case % 2 == 1, seed=100 + case, dtype=torch.float64,
                            device=kernel.device)
        with torch.no_grad():  # weights large enough to saturate most states
            args["w_h"].mul_(6.0)
            args["w_in"].mul_(4.0)
        lengths = torch.randint(1, T + 1, (B,), generator=g).to(kernel.device) if case % 3 == 0 else None
        loop = _errors(args, lengths, "reference")
        fused = _errors(args, lengths, kernel.backend)
        worst += [(fused[k] / max(loop[k], 1.25e-6), case, k, fused[k], loop[k]) for k in loop]
    ratio, case, name, fused_err, loop_err = max(worst)
    assert ratio <= 8, f"case {case}: {name} error {fused_err:.1e}, the eager loop's {loop_err:.1e}"
