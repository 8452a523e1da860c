"""The dense cells' input projection ``x W^T + b`` on the CPU, with ``W`` packed once per call.

Float32 CPU tensors take, in order of preference, the C++ extension's panel products
(``panel_matmul``: its AVX-512 register-blocked kernel, where the CPU has AVX-512 and the extension
is already loaded) or torch's own oneDNN ops (``mkldnn::_reorder_linear_weight`` and
``mkldnn::_linear_pointwise``, the ops inductor's CPU path uses; private, so probed once). Every
other case (other devices and dtypes, torch.compile, torch.func transforms, neither provider)
takes ``F.linear``. The backward is F.linear's; its ``grad @ W`` and ``grad^T x`` on the panel
products too, except under ``create_graph`` (double backward), where it stays in plain
differentiable ops.
Timings: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cpu_ext


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether torch's oneDNN linear ops exist and run here (a tiny probe, once per process)."""
    try:
        w = torch.ones(2, 3)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), torch.ops.mkldnn._reorder_linear_weight(w, 1),
                                              None, "none", [], "")
        return torch.backends.mkldnn.is_available() and bool((y == 3).all())
    except Exception:  # a torch built without oneDNN, or ops that moved
        return False


def panel_products():
    """The C++ extension if it is loaded and its panel products run on this CPU, else None. (Never
    builds it: the fused CPU backend loads it before any projection.)"""
    ext = cpu_ext.loaded()
    return ext if ext is not None and ext.panel_products_here() else None


def available() -> bool:
    """Whether a packed provider (the panel products or oneDNN) can run here."""
    return panel_products() is not None or onednn_available()


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b):
        rows = x.reshape(-1, x.shape[-1])
        ext = panel_products()
        if ext is not None:
            y = ext.panel_matmul(rows, w, b, True)
        else:
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
        grad_x = grad_w = grad_b = None
        # create_graph: differentiable ops
        ext = None if torch.is_grad_enabled() or grad.dtype != torch.float32 else panel_products()
        if ctx.needs_input_grad[0]:
            if ext is not None:
                grad_x = ext.panel_matmul(grad_rows, w, None, False).reshape(*grad.shape[:-1], w.shape[1])
            else:
                grad_x = grad @ w
        bias = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1] and ext is not None:  # the bias gradient summed while grad is packed
            grad_w, grad_b = ext.weight_gradient(grad_rows, rows, bias)
        else:
            grad_w = grad_rows.t() @ rows if ctx.needs_input_grad[1] else None
            grad_b = grad_rows.sum(0) if bias else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, w: torch.Tensor, b=None) -> torch.Tensor:
    """``F.linear(x, w, b)``, with ``w`` packed once where that is faster and safe: float32 CPU
    tensors, outside torch.compile (which picks its own) and torch.func transforms."""
    eligible = (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                and (b is None or b.dtype == torch.float32) and x.numel() > 0
                and not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None
                and available())
    return _PackedLinear.apply(x, w, b) if eligible else F.linear(x, w, b)
