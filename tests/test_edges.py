"""At the edges, right or refused: differentiation modes the fused kernels cannot follow, small
integer ids, out-of-range lengths in a compiled graph, NaN/Inf where the C++ table shortcut or the
token table would differ from the loop, and module construction."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, jacfwd, jacrev, jvp, vmap

from fused_rnn import FusedCharLoopModel, FusedRNN, fused_rnn, rnn_reference
from conftest import backend_device, tiered
from helpers import cast, make_problem, run_with_grads

FUSED = ["cpu", "triton"]
ALL = ["reference", "cpu", "triton"]
WEIGHTS = ("w_in", "b_in", "w_h", "b_h", "h0", "embedding")


def problem(dtype=torch.float64, **kw):
    args = make_problem(3, 4, 5, E=3, V=6, dtype=dtype, **kw)
    return {k: (v.detach() if v is not None and v.is_floating_point() else v) for k, v in args.items()}


def last_state(args, backend):
    """h_n as a function of w_h alone (the rest closed over)."""
    return lambda w_h: fused_rnn(**{**args, "w_h": w_h}, backend=backend)[1]


# --- forward-mode AD, torch.func's transforms, double backward, vmap -----------------------------

@pytest.mark.parametrize("mode", ["jvp", "jacfwd", "forward_ad"])
def test_forward_mode_ad_with_auto_gives_the_reference_tangents(mode):
    args = problem()
    tangent = torch.randn_like(args["w_h"])
    got, want = (_forward_mode(mode, last_state(args, backend), args["w_h"], tangent)
                 for backend in ("auto", "reference"))
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want)


def _forward_mode(mode, fn, primal, tangent):
    if mode == "jvp":
        return jvp(fn, (primal,), (tangent,))[1]
    if mode == "jacfwd":
        return jacfwd(fn)(primal)
    with forward_ad.dual_level():
        return forward_ad.unpack_dual(fn(forward_ad.make_dual(primal, tangent))).tangent


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["jvp", "jacfwd", "forward_ad"])
def test_forward_mode_ad_on_a_fused_backend_refuses(backend, mode):
    args = problem(device=backend_device(backend))
    with pytest.raises(RuntimeError, match=r"does not support forward-mode AD.*backend='reference'"):
        _forward_mode(mode, last_state(args, backend), args["w_h"], torch.randn_like(args["w_h"]))


def test_forward_mode_ad_through_the_module():
    torch.manual_seed(0)
    model = FusedCharLoopModel(7, 4, 6).double()
    x = torch.randint(0, 7, (3, 5))
    params = dict(model.named_parameters())
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def tangent_of(backend):
        model.backend = backend
        return jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))[1]

    torch.testing.assert_close(tangent_of("auto"), tangent_of("reference"))
    model.backend = "cpu"
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        tangent_of("cpu")


@pytest.mark.parametrize("backend", ALL)
def test_jacrev_with_auto_or_reference_is_right_and_fused_refuses(backend):
    args = problem(device=backend_device(backend))
    fn = last_state(args, backend)
    if backend in FUSED:
        with pytest.raises(RuntimeError, match=r"reverse-mode transforms.*backend='reference'"):
            jacrev(fn)(args["w_h"])
        fn = last_state(args, "auto")
    torch.testing.assert_close(jacrev(fn)(args["w_h"]), jacfwd(last_state(args, "reference"))(args["w_h"]))


@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_on_a_fused_backend_is_exact(backend, tokens):
    """gradgradcheck through the function: the backward, when recorded, is the reference loop's."""
    args = make_problem(2, 3, 3, E=2, V=4, tokens=tokens, dtype=torch.float64, device=backend_device(backend))
    names = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return fused_rnn(**{**args, **dict(zip(names, tensors))}, backend=backend)

    assert torch.autograd.gradgradcheck(fn, [args[k] for k in names])


def test_plain_backward_runs_the_fused_backward(monkeypatch):
    """Only backward(create_graph=True) recomputes through the loop; a plain backward does not."""
    from fused_rnn import recurrence_op
    monkeypatch.setattr(recurrence_op, "_double_backward_grads", lambda *a: pytest.fail("recomputed"))
    args = problem()
    w_h = args["w_h"].clone().requires_grad_()
    last_state(args, "cpu")(w_h).sum().backward()
    assert w_h.grad is not None


def test_double_backward_on_the_reference_works():
    args = problem()
    w_h = args["w_h"].clone().requires_grad_()
    grad, = torch.autograd.grad(last_state(args, "reference")(w_h).sum(), w_h, create_graph=True)
    grad.sum().backward()
    assert w_h.grad is not None and torch.isfinite(w_h.grad).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("what", ["ids", "lengths"])
def test_vmap_over_ids_or_lengths_refuses(backend, what):
    device = backend_device(backend)
    args = problem(device=device)
    stacked = (torch.stack([args["x"], args["x"].flip(0)]) if what == "ids"
               else torch.tensor([[1, 2, 4], [4, 3, 2]], device=device))

    def fn(v):
        kw = {"x": v} if what == "ids" else {"lengths": v}
        return fused_rnn(**{**args, **kw}, backend=backend)[1]

    with pytest.raises(RuntimeError, match="vmap over token ids or lengths is not supported"):
        vmap(fn)(stacked)


# torch 2.15 says so itself ("not yet implemented the batching rule ... performance drop"): the
# loop over the vmapped dimension that the README documents
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_vmap_over_weights_on_the_cpu_backend_is_a_loop():
    args = problem()
    w = torch.stack([args["w_h"], 0.5 * args["w_h"]])
    got = vmap(last_state(args, "cpu"))(w)
    want = torch.stack([last_state(args, "reference")(wi) for wi in w])
    torch.testing.assert_close(got, want)


# --- token ids and lengths of every integer dtype ------------------------------------------------

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.int64,
              torch.uint32, torch.uint64]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_ids_and_lengths_of_every_integer_dtype(backend, dtype):
    device = backend_device(backend)
    args = problem(dtype=torch.float32, device=device)
    lengths = torch.tensor([4, 1, 3], device=device)
    want = fused_rnn(**args, lengths=lengths, backend=backend)
    small = {**args, "x": args["x"].to(dtype)}
    got = fused_rnn(**small, lengths=lengths.to(dtype), backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16], ids=str)
def test_negative_small_ids_are_refused(dtype):
    args = problem(dtype=torch.float32)
    args["x"] = args["x"].to(dtype)
    args["x"][0, 0] = -1
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 6\), got values in \[-1"):
        fused_rnn(**args, backend="reference")


def test_auto_with_half_weights_on_the_cpu_takes_uint8_ids():
    args = problem(dtype=torch.bfloat16)
    output, _ = fused_rnn(**{**args, "x": args["x"].to(torch.uint8)})
    torch.testing.assert_close(output, fused_rnn(**args)[0], rtol=0, atol=0)


# --- lengths in a compiled graph ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_out_of_range_lengths_are_caught_in_the_compiled_graph(backend):
    # CPU tensors: on CUDA a bad length is a device-side assert, which ends the process
    # (benchmarks/gpu_extra_checks.py sees that in a child process)
    device = "cpu"
    args = problem(dtype=torch.float32, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda lengths: fused_rnn(**args, lengths=lengths, backend=backend),
                             fullgraph=True)
    good = torch.tensor([4, 1, 3], device=device)
    for got, want in zip(compiled(good), fused_rnn(**args, lengths=good, backend=backend)):
        torch.testing.assert_close(got, want)
    for bad in ([0, 1, 3], [-1, 2, 2], [4, 5, 1]):
        with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, T=4\]"):
            compiled(torch.tensor(bad, device=device))


# --- NaN / Inf where a fused path reads what the loop does not ------------------------------------

def table_shortcut_problem(w_h_row, device):
    """B >= 2V and no h0 (the cpu forward's [V, H] table shortcut for h_1, h_2): every token's
    input row is 1.5, and w_h's first row is ``w_h_row``, so h_1[0] = -1 and step 2's sum holds
    huge terms of both signs that the loop adds before multiplying."""
    args = make_problem(8, 3, 2, E=3, V=4, h0=False, device=device, seed=2)
    with torch.no_grad():
        args["w_in"].zero_()
        args["b_in"].fill_(1.5)
        args["w_h"][0] = torch.tensor(w_h_row, device=device)
    return args


# The interpreter's numpy matmul warns about inf - inf and overflow; the loop has them too.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ALL[1:])
@pytest.mark.parametrize("w_h_row", [[-float("inf"), 0.1], [-3e38, -3e38]], ids=["inf", "near-overflow"])
def test_table_shortcut_agrees_with_the_loop_on_inf_and_overflow(backend, w_h_row):
    args = table_shortcut_problem(w_h_row, backend_device(backend))
    with torch.no_grad():
        got = fused_rnn(**args, backend=backend)
        want = rnn_reference(**args)
    assert torch.isfinite(want[0]).all()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("B", [4, 16], ids=["B4", "B16"])  # cpu: per-position sums / [V, H] tables
def test_nonfinite_embedding_row_of_an_absent_token_reaches_no_gradient(backend, value, B):
    args = make_problem(B, 5, 4, E=3, V=6, device=backend_device(backend), seed=3)
    args["x"] = args["x"] % 5  # token 5 never occurs
    with torch.no_grad():
        args["embedding"][5] = value
    got = run_with_grads(lambda **a: fused_rnn(**a, backend=backend), args)
    want = run_with_grads(rnn_reference, cast(args, torch.float64))
    for name in want:
        assert torch.isfinite(want[name]).all(), name
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-5, msg=name)


# --- module construction ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda b: FusedRNN(4, 8, backend=b), lambda b: FusedCharLoopModel(5, 3, 4, backend=b)],
                         ids=["FusedRNN", "FusedCharLoopModel"])
@pytest.mark.parametrize("backend", ["gpu", "cuda", "Triton", ""])
def test_unknown_backend_refused_at_construction(make, backend):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpu', 'reference'\)"):
        make(backend)


def test_dropout_with_one_layer_warns_as_nn_rnn_does():
    with pytest.warns(UserWarning, match="dropout=0.5 does nothing with num_layers=1"):
        FusedRNN(4, 8, dropout=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusedRNN(4, 8, num_layers=2, dropout=0.5)
        FusedRNN(4, 8, dropout=0.0)


@pytest.mark.parametrize("fast_mode", tiered([True, False], fast={True}), ids=["fast", "full"])
@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_through_the_twins(backend, fast_mode):
    """gradgradcheck through fused_rnn.RNN (2 layers, bidirectional, packed uneven sequences)
    and fused_rnn.RNNCell, every input and parameter, as nn.RNN supports it."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from fused_rnn import RNN, RNNCell

    device = backend_device(backend)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()

    for module, make_args in [
            (RNN(2, 2, num_layers=2, bidirectional=True, dtype=torch.float64, device=device, backend=backend),
             lambda: (rand(3, 2, 2), rand(4, 2, 2))),
            (RNNCell(2, 3, nonlinearity="relu", dtype=torch.float64, device=device, backend=backend),
             lambda: (rand(2, 2) + 0.5, rand(2, 3)))]:
        names = [n for n, _ in module.named_parameters()]
        lengths = torch.tensor([3, 1])

        def run(x, hx, *params, module=module):
            if isinstance(module, RNN):
                x = pack_padded_sequence(x, lengths, enforce_sorted=False)
            out = functional_call(module, dict(zip(names, params)), (x, hx))
            return (out[0].data, out[1]) if isinstance(module, RNN) else out

        inputs = (*make_args(), *(p.detach().clone().requires_grad_() for p in module.parameters()))
        assert torch.autograd.gradgradcheck(run, inputs, fast_mode=fast_mode), type(module).__name__
