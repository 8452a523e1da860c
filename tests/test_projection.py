"""The dense cells' input projection (fused_rnn/ops/projection.py) on each packed provider (the C++
panel products, torch's oneDNN ops): F.linear's results and gradients, and F.linear itself
wherever neither applies."""
import pytest
import torch
import torch.nn.functional as F

from fused_rnn.ops import cpu_ext, projection
from helpers import rel_err


@pytest.fixture(params=["panels", "onednn"])
def provider(request, monkeypatch):
    """Runs the test on one provider, the other switched off."""
    if request.param == "panels":
        if cpu_ext.unavailable_reason() is not None or not cpu_ext.load().panel_products_here():
            pytest.skip("the panel products need the C++ extension on a CPU with AVX-512")
        monkeypatch.setattr(projection, "onednn_available", lambda: False)
    else:
        if not projection.onednn_available():
            pytest.skip("this torch has no oneDNN linear ops")
        monkeypatch.setattr(projection, "panel_products", lambda: None)
    return request.param


@pytest.mark.parametrize("shape", [(7, 5, 33, 40), (3, 2, 1, 1), (50, 3, 70, 129)], ids=lambda s: "x{}x{}x{}-out{}".format(*s))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_forward_and_gradients(provider, bias, shape):
    T, B, I, O = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=g).transpose(0, 1).requires_grad_()  # non-contiguous, as the callers'
    w = torch.randn(O, I, generator=g, requires_grad=True)
    b = torch.randn(O, generator=g, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    grad = torch.randn(B, T, O, generator=g)
    got = [projection.linear(x, w, b)]
    got += torch.autograd.grad(got[0], leaves, grad)
    x64, w64, b64 = (None if t is None else t.detach().double() for t in (x, w, b))
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    want = [F.linear(x64, w64, b64)]
    want += torch.autograd.grad(want[0], leaves64, grad.double())
    for a, e in zip(got, want):
        assert a.shape == e.shape and rel_err(a, e) < 1e-5


def test_double_backward_through_it(provider):
    x = torch.randn(4, 6, dtype=torch.float32, requires_grad=True)
    w = torch.randn(3, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(projection.linear(x, w).pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), w)
    x64, w64 = x.detach().double(), w.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(F.linear(x64.requires_grad_(), w64).pow(2).sum(), x64, create_graph=True)
    (gw64,) = torch.autograd.grad(gx64.sum(), w64)
    assert rel_err(gw, gw64) < 1e-5


def test_other_dtypes_take_f_linear_exactly():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(projection.linear(x, w), F.linear(x, w))


def test_panel_matmul_refuses_what_it_cannot_multiply():
    if cpu_ext.unavailable_reason() is not None or not cpu_ext.load().panel_products_here():
        pytest.skip("the panel products need the C++ extension on a CPU with AVX-512")
    ext = cpu_ext.load()
    with pytest.raises(ValueError, match="do not multiply"):
        ext.panel_matmul(torch.ones(2, 3), torch.ones(4, 5), None, True)
    with pytest.raises(TypeError, match="float32"):
        ext.panel_matmul(torch.ones(2, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64), None, True)
    with pytest.raises(ValueError, match="bias"):
        ext.panel_matmul(torch.ones(2, 3), torch.ones(4, 3), torch.ones(5), True)
    assert torch.equal(ext.panel_matmul(torch.ones(2, 0), torch.ones(4, 0), torch.arange(4.0), True),
                       torch.arange(4.0).expand(2, 4))


@pytest.mark.parametrize("shape", [(300, 77, 70), (1, 1, 1), (129, 6, 64), (5, 200, 3), (7, 3, 0)],
                         ids=lambda s: "K{}-M{}-N{}".format(*s))
def test_weight_gradient_is_dT_x_whatever_the_thread_count(shape):
    """The panel products' weight and bias gradients (d^T x, d.sum(0)): within fp32 rounding of
    float64 (K over several blocks of rows, M in uneven tiles, N over a padded panel, or none),
    non-contiguous inputs, the same bits on one thread and on two; and one-line refusals."""
    if cpu_ext.unavailable_reason() is not None or not cpu_ext.load().panel_products_here():
        pytest.skip("the panel products need the C++ extension on a CPU with AVX-512")
    ext = cpu_ext.load()
    K, M, N = shape
    g = torch.Generator().manual_seed(K)
    d, x = torch.randn(M, K, generator=g).t(), torch.randn(K, N, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(ext.weight_gradient(d, x, True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    grad_w, grad_b = results[0]
    assert grad_w.shape == (M, N) and (N == 0 or rel_err(grad_w, d.double().t() @ x.double()) < 1e-6)
    assert rel_err(grad_b, d.double().sum(0)) < 1e-6
    assert ext.weight_gradient(d, x)[1] is None
    with pytest.raises(ValueError, match="as many rows"):
        ext.weight_gradient(torch.ones(2, 3), torch.ones(4, 3))
    with pytest.raises(TypeError, match="float32"):
        ext.weight_gradient(torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    empty_w, empty_b = ext.weight_gradient(torch.ones(0, 3), torch.ones(0, 2), True)
    assert torch.equal(empty_w, torch.zeros(3, 2)) and torch.equal(empty_b, torch.zeros(3))


def test_weight_gradient_reads_aligned_rows_in_place_with_the_packed_bits():
    """x's rows are read where they lie when its panels are whole and 64-byte aligned, and packed
    otherwise (here the same values one float off alignment): the same sums, the same bits."""
    if cpu_ext.unavailable_reason() is not None or not cpu_ext.load().panel_products_here():
        pytest.skip("the panel products need the C++ extension on a CPU with AVX-512")
    ext = cpu_ext.load()
    K, M, N = 300, 20, 128
    g = torch.Generator().manual_seed(3)
    d, x = torch.randn(K, M, generator=g), torch.randn(K, N, generator=g)
    off_alignment = torch.empty(K * N + 1)[1:].view(K, N).copy_(x)
    assert x.data_ptr() % 64 == 0 and off_alignment.data_ptr() % 64 != 0
    in_place, packed = ext.weight_gradient(d, x, True), ext.weight_gradient(d, off_alignment, True)
    assert torch.equal(in_place[0], packed[0]) and torch.equal(in_place[1], packed[1])
    assert rel_err(in_place[0], d.double().t() @ x.double()) < 1e-6
