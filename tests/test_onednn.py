"""The oneDNN input projection (fused_rnn/ops/onednn.py): F.linear's results and gradients, and
F.linear itself wherever it does not apply."""
import pytest
import torch
import torch.nn.functional as F

from fused_rnn.ops import onednn
from helpers import rel_err


@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_forward_and_gradients(bias):
    if not onednn.available():
        pytest.skip("this torch has no oneDNN linear ops: F.linear runs (tested below)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 33, generator=g).transpose(0, 1).requires_grad_()  # non-contiguous, as the callers'
    w = torch.randn(40, 33, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    grad = torch.randn(5, 7, 40, generator=g)
    got = [onednn.linear(x, w, b)]
    got += torch.autograd.grad(got[0], leaves, grad)
    x64, w64, b64 = (None if t is None else t.detach().double() for t in (x, w, b))
    leaves64 = [t.requires_grad_() for t in (x64, w64, b64) if t is not None]
    want = [F.linear(x64, w64, b64)]
    want += torch.autograd.grad(want[0], leaves64, grad.double())
    for a, e in zip(got, want):
        assert a.shape == e.shape and rel_err(a, e) < 1e-5


def test_double_backward_through_it():
    x = torch.randn(4, 6, dtype=torch.float32, requires_grad=True)
    w = torch.randn(3, 6, requires_grad=True)
    (gx,) = torch.autograd.grad(onednn.linear(x, w).pow(2).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.sum(), w)
    x64, w64 = x.detach().double(), w.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(F.linear(x64.requires_grad_(), w64).pow(2).sum(), x64, create_graph=True)
    (gw64,) = torch.autograd.grad(gx64.sum(), w64)
    assert rel_err(gw, gw64) < 1e-5


def test_other_dtypes_take_f_linear_exactly():
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(onednn.linear(x, w), F.linear(x, w))
