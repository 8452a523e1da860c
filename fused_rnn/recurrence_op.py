"""The fused recurrence as PyTorch custom ops with autograd: one op for all T steps forward,
one for the backward, on the backend's kernels (the C++ extension or Triton)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .dispatch import kernels
from .eager import eager_or_op, with_eager_path
from .ops import elman_q_time_major, loop, output_view, states_shape, workspace_dtype


# The fused recurrence as PyTorch custom ops, so that torch.compile(fullgraph=True) can trace
# through it (the fake implementations give it the output shapes) and autograd sees one node.
#
# fused_rnn::recurrence(proj, ids, w_h, b_h, h0, backend, allow_tf32, cell, w_in=None, b_in=None)
#   -> (states, h_n)
#   states (fp32; fp64 for fp64 inputs) in the backend's layout (ops.states_shape); the public
#   function returns ops.output_view(states) as the [B, T, H] output; h_n [B, H] in the inputs'
#   dtype. cell: a cells.Cell's name; where its input enters after the product (nn.RNN's cells)
#   proj is q with both biases in it (no ids, no b_h), in the layout of ops.elman_q_time_major,
#   or (the cpu backend, w_in given) the dense input x [B, T, I], with q = x W_in^T + b_h formed
#   inside the time loop. The course cell's proj is the [V, H] table with ids, the dense
#   [B, T, H] without, or (the cpu backend, ids and w_in given) the embedding [V, E], with the
#   table E W_in^T + b_in formed inside.


def _batch_and_steps(proj, ids, backend, cell, w_in):
    if ids is not None:
        return ids.shape
    return proj.shape[1::-1] if w_in is None and elman_q_time_major(backend, cell) else proj.shape[:2]


def input_inside(w_in, backend, *biases) -> tuple:
    """The kernels' trailing arguments for the input projection inside the recurrence (``w_in``
    and its bias where that is not ``b_h``): none without ``w_in``; only the cpu backend takes them."""
    if w_in is None:
        if any(b is not None for b in biases):
            raise ValueError("an input bias needs its weight w_in")
        return ()
    if backend != "cpu":
        raise ValueError(f"the input projection inside the recurrence needs the cpu backend, got {backend!r}")
    return (w_in, *biases)


def _recurrence(proj: torch.Tensor, ids: Optional[torch.Tensor], w_h: torch.Tensor,
                b_h: Optional[torch.Tensor], h0: Optional[torch.Tensor], backend: str,
                allow_tf32: bool, cell: str, w_in: Optional[torch.Tensor] = None,
                b_in: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    states = kernels(backend).rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32, cell, *input_inside(w_in, backend, b_in))
    return states, output_view(states, backend)[:, -1].to(w_h.dtype, copy=True)


recurrence_op = torch.library.custom_op("fused_rnn::recurrence", _recurrence, mutates_args=())


@recurrence_op.register_fake
def _(proj, ids, w_h, b_h, h0, backend, allow_tf32, cell, w_in=None, b_in=None):
    B, T = _batch_and_steps(proj, ids, backend, cell, w_in)
    H = w_h.shape[0]
    states = w_h.new_empty(states_shape(backend, B, T, H), dtype=workspace_dtype(w_h.dtype))
    return states, w_h.new_empty((B, H))


def _recurrence_backward(grad_states: torch.Tensor, grad_h_n: Optional[torch.Tensor], states: torch.Tensor,
                         h0: Optional[torch.Tensor], proj: torch.Tensor, ids: Optional[torch.Tensor],
                         w_h: torch.Tensor, has_bias: bool, backend: str, allow_tf32: bool, cell: str,
                         w_in: Optional[torch.Tensor] = None, b_in: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_proj, grad_w_h, grad_b_h, grad_h0, grad_w_in, grad_b_in); grad_b_h is empty without a
    bias, grad_h0 without h0, grad_w_in without w_in, grad_b_in without b_in. grad_h_n None: zeros."""
    grads = kernels(backend).rnn_bwd(output_view(grad_states, backend), grad_h_n, states, h0, proj, ids, w_h,
                                     has_bias, allow_tf32, cell, *input_inside(w_in, backend, b_in))
    grads = tuple(grads) + (None,) * (6 - len(grads))
    present = (True, True, has_bias, h0 is not None, w_in is not None, b_in is not None)
    return tuple(g if p else w_h.new_empty(0) for g, p in zip(grads, present))  # empties of their own: no aliases


recurrence_backward_op = torch.library.custom_op("fused_rnn::recurrence_backward", _recurrence_backward,
                                                 mutates_args=())


@recurrence_backward_op.register_fake
def _(grad_states, grad_h_n, states, h0, proj, ids, w_h, has_bias, backend, allow_tf32, cell, w_in=None, b_in=None):
    def like(t):
        return torch.empty_like(t) if t is not None else w_h.new_empty(0)
    return (torch.empty_like(proj), torch.empty_like(w_h), w_h.new_empty(w_h.shape[0] if has_bias else 0),
            like(h0), like(w_in), like(b_in))


def _recurrence_setup_context(ctx, inputs, output):
    proj, ids, w_h, b_h, h0, backend, allow_tf32, cell, *rest = inputs
    w_in, b_in = (list(rest) + [None, None])[:2]
    ctx.save_for_backward(proj, ids, w_h, b_h, output[0], h0, w_in, b_in)
    ctx.has_bias, ctx.backend, ctx.allow_tf32, ctx.cell = b_h is not None, backend, allow_tf32, cell
    ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not zeros


def _recomputed(proj, ids, w_h, b_h, h0, backend, cell, dtype, w_in, b_in):
    """``(states, h_n)`` as the op returns them, recomputed by the differentiable reference loop."""
    if w_in is not None and ids is not None:  # proj is the embedding: the reference loop's order
        p = F.linear(F.embedding(ids, proj), w_in, b_in)
    elif w_in is not None:  # proj is x, b_h q's bias
        p, b_h = F.linear(proj.to(dtype), w_in.to(dtype), b_h.to(dtype) if b_h is not None else None), None
    elif ids is not None:
        p = proj[ids]
    else:
        p = proj.transpose(0, 1) if elman_q_time_major(backend, cell) else proj
    hs = loop.states(p, w_h, b_h, h0, cell, dtype)  # [B, T, H]
    if backend == "cpu":  # time-major h_1..h_T
        states = hs.transpose(0, 1)
    else:  # the [B, T+1, H] workspace with h0 first
        first = hs.new_zeros(hs.shape[0], 1, hs.shape[2]) if h0 is None else h0.to(dtype).unsqueeze(1)
        states = torch.cat([first, hs], dim=1)
    return states, hs[:, -1].to(w_h.dtype)


def _double_backward_grads(ctx, grad_states, grad_h_n):
    """The backward as a recorded graph (``create_graph=True``: a gradient of this gradient will
    follow): the reference loop recomputes the forward under autograd and is differentiated, so
    second derivatives are exact on every backend; a plain backward never comes here."""
    proj, ids, w_h, b_h, states, h0, w_in, b_in = ctx.saved_tensors
    wanted = [(i, t) for i, t in ((0, proj), (2, w_h), (3, b_h), (4, h0), (8, w_in), (9, b_in))
              if t is not None and ctx.needs_input_grad[i]]
    outs = _recomputed(proj, ids, w_h, b_h, h0, ctx.backend, ctx.cell, states.dtype, w_in, b_in)
    grad_outs = [torch.zeros_like(outs[0]) if grad_states is None else grad_states,
                 torch.zeros_like(outs[1]) if grad_h_n is None else grad_h_n]
    return recorded_grads(outs, grad_outs, wanted, len(ctx.needs_input_grad))


def recorded_grads(outs, grad_outs, wanted, n_inputs: int) -> tuple:
    """The custom ops' gradients for ``wanted`` ``(index, input)`` pairs, as a recorded graph
    (``create_graph=True``), through the reference loop's recomputed ``outs``: ``n_inputs``
    entries, None where no gradient is wanted, zeros where the outputs do not reach an input."""
    found = torch.autograd.grad(outs, [t for _, t in wanted], grad_outs, create_graph=True, allow_unused=True)
    grads = [None] * n_inputs
    for (i, t), g in zip(wanted, found):
        grads[i] = torch.zeros_like(t) if g is None else g
    return tuple(grads)


def _recurrence_autograd(ctx, grad_states, grad_h_n):
    if torch.is_grad_enabled():  # backward(create_graph=True): record a differentiable backward
        return _double_backward_grads(ctx, grad_states, grad_h_n)
    proj, ids, w_h, _, states, h0, w_in, b_in = ctx.saved_tensors
    if grad_states is None:
        grad_states = torch.zeros_like(states)
    grad_proj, grad_w_h, grad_b_h, grad_h0, grad_w_in, grad_b_in = _backward(
        grad_states, grad_h_n, states, h0, proj, ids, w_h, ctx.has_bias, ctx.backend, ctx.allow_tf32, ctx.cell, w_in,
        b_in)
    grads = (grad_proj, None, grad_w_h, grad_b_h if ctx.has_bias else None,
             grad_h0 if ctx.needs_input_grad[4] else None, None, None, None,
             grad_w_in if w_in is not None else None, grad_b_in if b_in is not None else None)
    return grads[:len(ctx.needs_input_grad)]  # the eager path's Function counts only the arguments given


_backward = eager_or_op(recurrence_backward_op, _recurrence_backward)
recurrence_op.register_autograd(_recurrence_autograd, setup_context=_recurrence_setup_context)
# What the public functions call: the op, or in plain eager code its parts without the dispatch.
recurrence = with_eager_path(recurrence_op, _recurrence, _recurrence_setup_context, _recurrence_autograd)
