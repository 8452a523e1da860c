"""The C++ backend's buffers of 32 MB and more (states, dz, the course's dense grad_proj) come from
huge-page memory of its own: the results must be the reference's and the tensors ordinary ones."""
import sys

import pytest
import torch

from fused_rnn import elman_reference, elman_rnn, fused_rnn
from fused_rnn.ops import cpu_ext
from helpers import check_parity, make_problem

pytestmark = pytest.mark.skipif(cpu_ext.unavailable_reason() is not None, reason="C++ extension not built")

# fp64 [T, B, H] = [64, 128, 512]: exactly 32 MB, the smallest size that takes the huge-page path
B, T, H = 128, 64, 512


def test_course_cell_dense_input_with_32mb_buffers():
    args = make_problem(B, T, H, E=8, tokens=False, dtype=torch.float64, seed=3)
    check_parity(args, torch.float64, "cpu", function=fused_rnn)


def elman_case():
    g = torch.Generator().manual_seed(4)
    rnn = torch.nn.RNN(8, H, batch_first=True, dtype=torch.float64)
    x = torch.randn(B, T, 8, generator=g, dtype=torch.float64, requires_grad=True)
    return x, [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]


def test_elman_cell_with_32mb_buffers():
    x, weights = elman_case()
    inputs = [x, *weights]
    g = torch.Generator().manual_seed(5)
    go = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    results = []
    for fn, kw in ((elman_rnn, dict(backend="cpu")), (elman_reference, {})):
        output, h_n = fn(x, *weights, **kw)
        grads = torch.autograd.grad((output * go).sum() + h_n.sum(), inputs)
        results.append((output, h_n, *grads))
    for ours, theirs in zip(*results):
        assert (ours - theirs).abs().max() <= 1e-10 * theirs.abs().max()


def test_a_32mb_output_is_an_ordinary_tensor():
    x, weights = elman_case()
    with torch.no_grad():
        output, _ = elman_rnn(x, *weights, backend="cpu")
    assert output.untyped_storage().nbytes() >= 32 << 20
    if sys.platform == "linux":  # the huge-page path: 2 MB-aligned (at::empty's memory is not)
        assert output.untyped_storage().data_ptr() % (2 << 20) == 0
    kept = output.clone()
    output.resize_(output.numel() + 7)  # grows like any tensor's storage, keeping the data
    assert torch.equal(output[:kept.numel()], kept.transpose(0, 1).flatten())
    del output  # its memory goes back (the deleter runs; a double free would crash here)
    assert kept.sum().isfinite()
