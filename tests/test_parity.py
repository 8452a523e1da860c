"""The fused backends against the plain PyTorch reference: forward and every gradient."""
import pytest
import torch

from fused_rnn import fused_rnn, rnn_reference
from helpers import TOLERANCE, cast, check_parity, make_problem, rel_err, run_with_grads
from conftest import requires_cuda

# Odd sizes beside round ones; H=130/200 take more than one column block in every mode, B=70
# more than one batch block.
SHAPES = [(1, 1, 1), (1, 7, 16), (5, 7, 48), (5, 40, 100), (33, 7, 16), (33, 40, 48), (5, 1, 100),
          (70, 7, 130), (3, 5, 200)]


def shape_id(shape):
    B, T, H = shape
    return f"B{B}-T{T}-H{H}"


@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zero-h0"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
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


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
def test_gradcheck_fp64(tokens, kernel):
    args = make_problem(3, 4, 5, E=3, V=4, tokens=tokens, dtype=torch.float64, device=kernel.device)
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return fused_rnn(**{**args, **dict(zip(names, tensors))}, backend=kernel.backend)

    assert torch.autograd.gradcheck(fn, [args[k] for k in names])


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
    args = make_problem(16, 32, 256, device="cuda")
    exact = fused_rnn(**args, backend="triton")[0]
    tf32 = fused_rnn(**args, backend="triton", allow_tf32=True)[0]
    assert rel_err(tf32, exact) < 1e-2
