"""The LSTM's and GRU's fused recurrence as PyTorch custom ops with autograd: one op runs all T
steps forward, one the backward, on the backend's ``gated_fwd`` / ``gated_bwd`` (`ops/__init__.py`)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import cells
from .dispatch import gated_kernels
from .eager import eager_or_op, with_eager_path
from .ops import workspace_dtype
from .recurrence_op import input_inside, recorded_grads
from .reference import gated_loop

# fused_rnn::gated_recurrence(q, w_hh, b_hh, h0, c0, w_hr, backend, allow_tf32, cell, keep_saved,
#                             w_ih=None, b_ih=None)
#   -> (out [T, B, P], cs [T, B, H] (the GRU: empty), saved [T, B, 4H], h_n [B, P], c_n [B, H]
#   (the GRU: empty)), in ops.workspace_dtype. Differentiable through out, cs, h_n and c_n; saved
#   is the backward's own, empty when keep_saved is False (no backward will follow: inference).
#   h_n and c_n are copies of the last step's rows: as views of out and cs (out[-1]) their
#   gradients would reach the backward as [T, B, *] tensors of zeros with one step filled, added
#   to the others (at B=512, T=8, H=256 about 4% of a GRU's training step); as outputs of their
#   own they are added into the last step here. q [T, B, G*H], or (the cpu backend, w_ih given)
#   the dense input x [B, T, I], with q = x W_ih^T + b_ih formed inside the time loop.


def _empty_if_none(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def _gated_recurrence(q: torch.Tensor, w_hh: torch.Tensor, b_hh: Optional[torch.Tensor],
                     h0: Optional[torch.Tensor], c0: Optional[torch.Tensor], w_hr: Optional[torch.Tensor],
                     backend: str, allow_tf32: bool, cell: str, keep_saved: bool,
                     w_ih: Optional[torch.Tensor] = None, b_ih: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, cs, saved = gated_kernels(backend).gated_fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, cell, keep_saved,
                                                      *input_inside(w_ih, backend, b_ih))
    cs = _empty_if_none(cs, out)
    return (out, cs, saved if keep_saved else saved.new_empty(0), out[-1].clone(),
            cs[-1].clone() if cs.numel() else cs.new_empty(0))


gated_recurrence_op = torch.library.custom_op("fused_rnn::gated_recurrence", _gated_recurrence, mutates_args=())


@gated_recurrence_op.register_fake
def _(q, w_hh, b_hh, h0, c0, w_hr, backend, allow_tf32, cell, keep_saved, w_ih=None, b_ih=None):
    spec = cells.get(cell)
    T, B = q.shape[1::-1] if w_ih is not None else q.shape[:2]
    H = w_hh.shape[0] // spec.gates
    P = H if w_hr is None else w_hr.shape[0]
    dtype = workspace_dtype(w_hh.dtype)
    cs = q.new_empty((T, B, H) if "c" in spec.state else (0,), dtype=dtype)
    saved = q.new_empty((T, B, spec.saved_width * H) if keep_saved else (0,), dtype=dtype)
    c_n = q.new_empty((B, H) if "c" in spec.state else (0,), dtype=dtype)
    return q.new_empty((T, B, P), dtype=dtype), cs, saved, q.new_empty((B, P), dtype=dtype), c_n


def _gated_backward(grad_out: torch.Tensor, grad_cs: Optional[torch.Tensor], out: torch.Tensor,
                    cs: torch.Tensor, saved: torch.Tensor, q: torch.Tensor, w_hh: torch.Tensor,
                    b_hh: Optional[torch.Tensor], h0: Optional[torch.Tensor], c0: Optional[torch.Tensor],
                    w_hr: Optional[torch.Tensor], backend: str, allow_tf32: bool, cell: str,
                    w_ih: Optional[torch.Tensor] = None, b_ih: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
    """(grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0, grad_w_hr, grad_w_ih, grad_b_ih); empty for
    an absent input."""
    grads = gated_kernels(backend).gated_bwd(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr,
                                             allow_tf32, cell, *input_inside(w_ih, backend, b_ih))
    grads = tuple(grads) + (() if w_ih is not None else (None, None))
    return tuple(_empty_if_none(g, q) for g in grads)  # a new empty tensor for each: returns may not alias


gated_backward_op = torch.library.custom_op("fused_rnn::gated_recurrence_backward", _gated_backward,
                                            mutates_args=())


@gated_backward_op.register_fake
def _(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr, backend, allow_tf32, cell, w_ih=None,
      b_ih=None):
    return tuple(torch.empty_like(t) if t is not None else q.new_empty(0)
                 for t in (q, w_hh, b_hh, h0, c0, w_hr, w_ih, b_ih))


def _setup_context(ctx, inputs, output):
    q, w_hh, b_hh, h0, c0, w_hr, backend, allow_tf32, cell, _, *inside = inputs
    w_ih, b_ih = (inside + [None, None])[:2]
    out, cs, saved, _, _ = output
    ctx.save_for_backward(q, w_hh, b_hh, h0, c0, w_hr, out, cs, saved, w_ih, b_ih)
    ctx.backend, ctx.allow_tf32, ctx.cell = backend, allow_tf32, cell
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # no [T, B, 4H] of zeros for saved (nor for an unused cs): None


def _double_backward_grads(ctx, grad_out, grad_cs):
    """The backward as a recorded graph (``create_graph=True``): the reference loop recomputes the
    forward under autograd and is differentiated, so second derivatives are exact on every
    backend; a plain backward never comes here."""
    q, w_hh, b_hh, h0, c0, w_hr, out, _, _, w_ih, b_ih = ctx.saved_tensors
    inputs = (q, w_hh, b_hh, h0, c0, w_hr)
    wanted = [(i, t) for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    wanted += [(i, t) for i, t in ((10, w_ih), (11, b_ih)) if t is not None and ctx.needs_input_grad[i]]
    dtype = out.dtype
    cast = [None if t is None else t.to(dtype) for t in inputs + (w_ih, b_ih)]
    if w_ih is not None:  # q is x [B, T, I]: the loop's q, time-major
        cast[0] = F.linear(cast[0].transpose(0, 1), cast[6], cast[7])
    new_out, new_cs, _ = gated_loop(cells.get(ctx.cell), *cast[:6])
    outs, grads = [new_out], [torch.zeros_like(new_out) if grad_out is None else grad_out]
    if new_cs is not None and grad_cs is not None:
        outs.append(new_cs)
        grads.append(grad_cs)
    return recorded_grads(outs, grads, wanted, 12)


def _with_last_step(grad_all, grad_last, like):
    """The gradient at every step with the last step's own (h_n's, c_n's) added: a new tensor (the
    one autograd passed may be the caller's), None where neither is given."""
    if grad_last is None:
        return grad_all
    merged = torch.zeros_like(like) if grad_all is None else grad_all.clone(memory_format=torch.contiguous_format)
    merged[-1] += grad_last
    return merged


def _autograd(ctx, grad_out, grad_cs, _grad_saved, grad_h_n, grad_c_n):
    q, w_hh, b_hh, h0, c0, w_hr, out, cs, saved, w_ih, b_ih = ctx.saved_tensors
    grad_out = _with_last_step(grad_out, grad_h_n, out)
    grad_cs = _with_last_step(grad_cs, grad_c_n, cs)
    if torch.is_grad_enabled():  # backward(create_graph=True): record a differentiable backward
        return _double_backward_grads(ctx, grad_out, grad_cs)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_cs is not None and grad_cs.numel() == 0:
        grad_cs = None
    grads = _backward(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr,
                            ctx.backend, ctx.allow_tf32, ctx.cell, w_ih, b_ih)
    inputs = (q, w_hh, b_hh, h0, c0, w_hr, None, None, None, None, w_ih, b_ih)
    grads = grads[:6] + (None,) * 4 + grads[6:]
    return tuple(g.to(t.dtype) if t is not None and ctx.needs_input_grad[i] else None
                 for i, (g, t) in enumerate(zip(grads, inputs)))


_backward = eager_or_op(gated_backward_op, _gated_backward)
gated_recurrence_op.register_autograd(_autograd, setup_context=_setup_context)
# What the public functions call: the op, or in plain eager code its parts without the dispatch.
gated_recurrence = with_eager_path(gated_recurrence_op, _gated_recurrence, _setup_context, _autograd)
