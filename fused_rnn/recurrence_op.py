"""The fused recurrence as PyTorch custom ops with autograd: one op for all T steps forward,
one for the backward, on the backend's kernels (the C++ extension or Triton)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .dispatch import kernels
from .ops import elman_q_time_major, output_view, states_shape, workspace_dtype


# The fused recurrence as PyTorch custom ops, so that torch.compile(fullgraph=True) can trace
# through it (the fake implementations give it the output shapes) and autograd sees one node.
#
# fused_rnn::recurrence(proj, ids, w_h, b_h, h0, backend, allow_tf32, cell) -> (states, h_n)
#   states (fp32; fp64 for fp64 inputs) in the backend's layout (ops.states_shape); the public
#   function returns ops.output_view(states) as the [B, T, H] output; h_n [B, H] in the inputs'
#   dtype. cell: a cells.Cell's name; where its input enters after the product (nn.RNN's cells)
#   proj is q with both biases in it (no ids, no b_h), in the layout of ops.elman_q_time_major.


def _batch_and_steps(proj, ids, backend, cell):
    if ids is not None:
        return ids.shape
    return proj.shape[1::-1] if elman_q_time_major(backend, cell) else proj.shape[:2]


@torch.library.custom_op("fused_rnn::recurrence", mutates_args=())
def recurrence(proj: torch.Tensor, ids: Optional[torch.Tensor], w_h: torch.Tensor,
                b_h: Optional[torch.Tensor], h0: Optional[torch.Tensor], backend: str,
                allow_tf32: bool, cell: str) -> Tuple[torch.Tensor, torch.Tensor]:
    states = kernels(backend).rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32, cell)
    return states, output_view(states, backend)[:, -1].to(w_h.dtype, copy=True)


@recurrence.register_fake
def _(proj, ids, w_h, b_h, h0, backend, allow_tf32, cell):
    B, T = _batch_and_steps(proj, ids, backend, cell)
    H = w_h.shape[0]
    states = w_h.new_empty(states_shape(backend, B, T, H), dtype=workspace_dtype(w_h.dtype))
    return states, w_h.new_empty((B, H))


@torch.library.custom_op("fused_rnn::recurrence_backward", mutates_args=())
def _recurrence_backward(grad_states: torch.Tensor, grad_h_n: torch.Tensor, states: torch.Tensor,
                         h0: Optional[torch.Tensor], proj: torch.Tensor, ids: Optional[torch.Tensor],
                         w_h: torch.Tensor, has_bias: bool, backend: str, allow_tf32: bool, cell: str
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_proj, grad_w_h, grad_b_h, grad_h0); grad_b_h is empty without a bias."""
    grad_proj, grad_w_h, grad_b_h, grad_h0 = kernels(backend).rnn_bwd(
        output_view(grad_states, backend), grad_h_n, states, h0, proj, ids, w_h, has_bias, allow_tf32, cell)
    return grad_proj, grad_w_h, grad_b_h if has_bias else w_h.new_empty(0), grad_h0


@_recurrence_backward.register_fake
def _(grad_states, grad_h_n, states, h0, proj, ids, w_h, has_bias, backend, allow_tf32, cell):
    B, H = grad_h_n.shape
    return (torch.empty_like(proj), torch.empty_like(w_h), w_h.new_empty(H if has_bias else 0),
            w_h.new_empty((B, H)))


def _recurrence_setup_context(ctx, inputs, output):
    proj, ids, w_h, b_h, h0, backend, allow_tf32, cell = inputs
    ctx.save_for_backward(proj, ids, w_h, output[0], h0)
    ctx.has_bias, ctx.backend, ctx.allow_tf32, ctx.cell = b_h is not None, backend, allow_tf32, cell


def _recurrence_autograd(ctx, grad_states, grad_h_n):
    proj, ids, w_h, states, h0 = ctx.saved_tensors
    if grad_states is None:
        grad_states = torch.zeros_like(states)
    if grad_h_n is None:
        B, H = output_view(states, ctx.backend).shape[0], w_h.shape[0]
        grad_h_n = w_h.new_zeros((B, H))
    grad_proj, grad_w_h, grad_b_h, grad_h0 = _recurrence_backward(
        grad_states, grad_h_n, states, h0, proj, ids, w_h, ctx.has_bias, ctx.backend, ctx.allow_tf32, ctx.cell)
    return (grad_proj, None, grad_w_h, grad_b_h if ctx.has_bias else None,
            grad_h0 if ctx.needs_input_grad[4] else None, None, None, None)


recurrence.register_autograd(_recurrence_autograd, setup_context=_recurrence_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fused_rnn: the fused backends ('cpu', 'triton') have no double backward (a "
                       "gradient of a gradient: create_graph=True then backward again, hessian, "
                       "gradient penalties); use backend='reference'")


# Registered so that a second backward names the limit instead of PyTorch's generic message.
_recurrence_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
