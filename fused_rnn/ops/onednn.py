"""The input projection ``x W^T + b`` on the CPU through oneDNN with the weight packed once per
call: torch's own ``mkldnn::_reorder_linear_weight`` and ``mkldnn::_linear_pointwise`` (the ops
inductor's CPU path uses). They are private, so their presence is probed once and every other
case (other devices and dtypes, torch.compile, torch.func transforms) takes ``F.linear``.

Measured on 2 cores at the LSTM's ``[16384, 256] x [256, 1024]``: 67 ms against ``F.linear``'s 87
(benchmarks/RESULTS.md). The backward is ``F.linear``'s, in plain differentiable ops.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether torch's oneDNN linear ops exist and run here (a tiny probe, once per process)."""
    try:
        w = torch.ones(2, 3)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), torch.ops.mkldnn._reorder_linear_weight(w, 1),
                                              None, "none", [], "")
        return torch.backends.mkldnn.is_available() and bool((y == 3).all())
    except Exception:  # a torch built without oneDNN, or ops that moved
        return False


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b):
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(rows, torch.ops.mkldnn._reorder_linear_weight(w, rows.shape[0]),
                                               b, "none", [], "")
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        rows, grad_rows = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ w if ctx.needs_input_grad[0] else None
        grad_w = grad_rows.t() @ rows if ctx.needs_input_grad[1] else None
        grad_b = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, w: torch.Tensor, b=None) -> torch.Tensor:
    """``F.linear(x, w, b)``, through oneDNN with ``w`` packed once where that is faster and safe:
    float32 CPU tensors, outside torch.compile (which picks its own) and torch.func transforms."""
    eligible = (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                and (b is None or b.dtype == torch.float32) and x.numel() > 0
                and not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None
                and available())
    return _PackedLinear.apply(x, w, b) if eligible else F.linear(x, w, b)
