"""nn.RNN's own (Elman) cell, ``elman_rnn``, on every backend: the reference loop, the C++
extension, and the Triton blocked and persistent (stepwise without a GPU) kernels, against
``torch.nn.RNN`` itself in float64 and against the reference loop in float32."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fused_rnn import elman_reference, elman_rnn
from fused_rnn.ops import cpu_ext, planner
from conftest import backend_device, tiered
from helpers import TOLERANCE, rel_err

triton_rnn = pytest.importorskip("fused_rnn.ops.triton_rnn")
from test_persistent import persistent  # noqa: E402,F401  (the fixture)

# (backend, FUSED_RNN_TRITON_KERNEL)
BACKENDS = {
    "reference": ("reference", None),
    "cpu": ("cpu", None),
    "triton-blocked": ("triton", "blocked"),
    "triton-persistent": ("triton", "persistent"),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch):
    """(backend, device) with the Triton kernel family selected; the persistent one must run."""
    name, kernel = BACKENDS[request.param]
    device = backend_device(name)  # skips here, before the persistent spy, where triton cannot run
    calls, dtypes = None, set()
    if kernel == "persistent":
        calls = request.getfixturevalue("persistent")
        plan = planner.plan_persistent

        def spy(B, H, dtype, *args, **kwargs):
            dtypes.add(dtype)
            return plan(B, H, dtype, *args, **kwargs)
        monkeypatch.setattr(planner, "plan_persistent", spy)
    elif kernel is not None:
        monkeypatch.setenv(triton_rnn.KERNEL_ENV, kernel)
    yield name, device
    # (a GPU has no float64 persistent tiling: there the blocked kernels run float64)
    if calls is not None and not (device == "cuda" and dtypes == {torch.float64}):
        assert calls["fwd"] > 0 and calls["bwd"] > 0, "the persistent kernels did not run"


def make_rnn(I, H, nonlinearity, bias, dtype, device, seed):
    torch.manual_seed(seed)
    return torch.nn.RNN(I, H, nonlinearity=nonlinearity, bias=bias, batch_first=True, dtype=dtype,
                        device=device)


def grads_of(output, h_n, tensors, seed=1):
    """Random output gradients backpropagated to ``tensors`` (None entries stay None)."""
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(output.shape, generator=g, dtype=torch.float64).to(output)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(h_n)
    live = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad((output * go).sum() + (h_n * gh).sum(), live))
    return [None if t is None else next(grads) for t in tensors]


def run_both(rnn, x, h0, backend, device, lengths=None):
    """(ours, nn.RNN's): [output, h_n, grad x, grad h0, grad of each parameter], both on the same
    leaves (the packed nn.RNN when ``lengths`` is given)."""
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0] if rnn.bias else \
        [rnn.weight_ih_l0, rnn.weight_hh_l0, None, None]
    dev = [None if p is None else p.detach().to(device).requires_grad_() for p in params]
    x_d = x.detach().to(device).requires_grad_()
    h0_d = None if h0 is None else h0.detach().to(device).requires_grad_()
    out, h_n = elman_rnn(x_d, *dev, h0_d, nonlinearity=rnn.nonlinearity, backend=backend,
                         lengths=None if lengths is None else lengths.to(device))
    ours = [out, h_n] + grads_of(out, h_n, [x_d, h0_d] + dev)

    hx = None if h0 is None else h0[None]
    if lengths is None:
        out_r, h_r = rnn(x, hx)
    else:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out_p, h_r = rnn(packed, hx)
        out_r, _ = pad_packed_sequence(out_p, batch_first=True, total_length=x.shape[1])
    h_r = h_r[0]
    theirs = [out_r, h_r] + grads_of(out_r, h_r, [x, h0] + params)
    return ours, theirs


NAMES = ["output", "h_n", "grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh"]


def assert_close(ours, theirs, tol):
    for name, got, want in zip(NAMES, ours, theirs):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == want.dtype, name
            err = rel_err(got.cpu(), want)
            assert err < tol, f"{name}: relative error {err:.2e}"


# (B, T, I, H, h0, bias): odd B and H (not a multiple of 16), T = 1, H = 1, no bias, no h0
CASES = [(5, 7, 6, 19, True, True), (1, 1, 3, 5, False, True), (4, 3, 8, 16, True, False),
         (3, 4, 2, 33, False, False), (2, 3, 4, 1, True, True)]
CASE_IDS = ["B{}-T{}-I{}-H{}-{}-{}".format(*c[:4], "h0" if c[4] else "no-h0", "bias" if c[5] else "no-bias")
            for c in CASES]


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_nn_rnn_fp64(case, nonlinearity, backend):
    B, T, I, H, has_h0, bias = case
    rnn = make_rnn(I, H, nonlinearity, bias, torch.float64, "cpu", seed=B + T + H)
    g = torch.Generator().manual_seed(H)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True) if has_h0 else None
    ours, theirs = run_both(rnn, x, h0, *backend)
    assert_close(ours, theirs, 1e-9)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_lengths_match_packed_nn_rnn_fp64(nonlinearity, backend):
    """Padded sequences: outputs zero past each end, h_n at each last step, as nn.RNN on the
    packed batch (unsorted lengths)."""
    B, T, I, H = 5, 6, 3, 20
    rnn = make_rnn(I, H, nonlinearity, True, torch.float64, "cpu", seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 6, 1, 5, 2])
    ours, theirs = run_both(rnn, x, h0, *backend, lengths=lengths)
    assert_close(ours, theirs, 1e-9)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("shape", [(9, 5, 7, 40), (16, 3, 16, 64)], ids=lambda s: "B{}-T{}-I{}-H{}".format(*s))
def test_fp32_matches_the_reference(shape, nonlinearity, backend):
    B, T, I, H = shape
    rnn = make_rnn(I, H, nonlinearity, True, torch.float32, "cpu", seed=B)
    g = torch.Generator().manual_seed(T)
    x = torch.randn(B, T, I, generator=g)
    h0 = torch.randn(B, H, generator=g) * 0.5
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    name, device = backend
    leaves = [t.detach().to(device).requires_grad_() for t in [x, h0] + params]
    out, h_n = elman_rnn(leaves[0], *leaves[2:], leaves[1], nonlinearity=nonlinearity, backend=name)
    ours = [out, h_n] + grads_of(out, h_n, leaves)
    ref = [t.detach().double().requires_grad_() for t in [x, h0] + params]
    out_r, h_r = elman_reference(ref[0], *ref[2:], ref[1], nonlinearity=nonlinearity)
    want = [t.float() for t in [out_r, h_r] + grads_of(out_r, h_r, ref)]
    assert_close(ours, want, TOLERANCE[torch.float32])


@pytest.mark.parametrize("fast_mode", tiered([True, False], fast={True}), ids=["fast", "full"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("kernel", ["cpu", "triton-blocked", "triton-persistent"])
def test_gradcheck_fp64(kernel, nonlinearity, fast_mode, request, monkeypatch):
    name, family = BACKENDS[kernel]
    device = backend_device(name)
    if family == "persistent":
        request.getfixturevalue("persistent")
    elif family is not None:
        monkeypatch.setenv(triton_rnn.KERNEL_ENV, family)
    B, T, I, H = 3, 3, 2, 5
    g = torch.Generator().manual_seed(7)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()

    inputs = [rand(B, T, I), rand(H, I), rand(H, H) * 0.5, rand(H), rand(H), rand(B, H)]
    inputs = [t.detach().requires_grad_() for t in inputs]

    def fn(x, w_ih, w_hh, b_ih, b_hh, h0):
        return elman_rnn(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity=nonlinearity, backend=name)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast_mode)


@pytest.mark.parametrize("nonlinearity", tiered(["tanh", "relu"], fast={"tanh"}))
def test_torch_compile_fullgraph_cpu(nonlinearity):
    rnn = make_rnn(6, 16, nonlinearity, True, torch.float32, "cpu", seed=0)
    x = torch.randn(4, 5, 6)
    h0 = torch.randn(4, 16)
    lengths = torch.tensor([5, 2, 4, 1])
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in [x, h0] + params]
        out, h_n = fn(leaves[0], *leaves[2:], leaves[1], nonlinearity=nonlinearity, lengths=lengths,
                      backend="cpu")
        return [out, h_n] + grads_of(out, h_n, leaves)

    torch._dynamo.reset()
    got = run(torch.compile(elman_rnn, fullgraph=True))
    want = run(elman_rnn)
    for name, a, b in zip(NAMES, got, want):
        assert rel_err(a, b) < 1e-6, name


def test_autocast_runs_in_the_autocast_dtype():
    rnn = make_rnn(6, 16, "tanh", True, torch.float32, "cpu", seed=0)
    x = torch.randn(4, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, h_n = elman_rnn(x, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    assert output.dtype == h_n.dtype == torch.bfloat16
    want, _ = rnn(x)
    assert rel_err(output, want) < 2e-2
    output.float().sum().backward()  # gradients reach the fp32 parameters
    assert rnn.weight_hh_l0.grad is not None and rnn.weight_hh_l0.grad.dtype == torch.float32


def test_auto_picks_the_cpu_extension_for_fp32(monkeypatch):
    calls = []
    original = cpu_ext.rnn_fwd
    monkeypatch.setattr(cpu_ext, "rnn_fwd", lambda *a, **k: calls.append(a[6]) or original(*a, **k))  # a[6]: cell
    w_ih, w_hh = torch.randn(8, 3), torch.randn(8, 8) * 0.3
    elman_rnn(torch.randn(2, 4, 3), w_ih, w_hh, nonlinearity="relu")
    assert calls == ["elman_relu"]


def test_cpu_extension_refuses_an_unknown_cell():
    q, w_hh = torch.randn(3, 2, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="cell must be"):
        cpu_ext.load().rnn_fwd(q, None, w_hh, None, None, "gru")


# the kernels' inf - inf before their select, computed by the interpreter in numpy
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_relu_gradient_is_torchs_where_the_state_is_zero(backend):
    """torch.relu's backward gives 0 where the state is <= 0 whatever arrives there, inf included:
    an infinite output gradient at a dead unit must not turn the chain into NaN."""
    name, device = backend
    g = torch.Generator().manual_seed(3)
    B, T, I, H = 3, 4, 2, 5
    x, w_ih, w_hh, b = (torch.randn(*s, generator=g, dtype=torch.float64).to(device)
                        for s in [(B, T, I), (H, I), (H, H), (H,)])
    w_hh *= 0.5
    leaves = [t.clone().requires_grad_() for t in (x, w_ih, w_hh)]
    out = elman_reference(*leaves, b, None, nonlinearity="relu")[0].detach()
    dead = out <= 0
    assert dead.any() and (~dead).any()
    grad_out = torch.where(dead, torch.inf, 1.0)

    def grads(fn, **kw):
        leaves = [t.clone().requires_grad_() for t in (x, w_ih, w_hh)]
        output = fn(*leaves, b, None, nonlinearity="relu", **kw)[0]
        return torch.autograd.grad(output, leaves, grad_out)

    want = grads(elman_reference)
    got = grads(elman_rnn, backend=name)
    for a, w in zip(got, want):
        assert torch.isfinite(w).all()
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-12)
