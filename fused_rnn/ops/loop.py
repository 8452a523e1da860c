"""The reference loop at the kernels' interface: each cell's step from `reference.py` in plain
PyTorch (``states``/``loop_fwd``/``loop_bwd`` for the one-gate cells, ``gated_fwd``/``gated_bwd``
for the LSTM and GRU). It is the bottom of the Triton fallback chain (persistent -> blocked -> this), answering
when no kernel path passed its first-use self-check, and the differentiable recomputation behind
the fused backends' double backward (`recurrence_op.py`)."""
from __future__ import annotations

import torch

from .. import cells
from ..reference import (activation_grad, gated_loop, gru_pointwise_backward, lstm_pointwise_backward,
                         vanilla_loop)
from . import workspace_dtype


def states(p, w_h, b_h, h0, cell, dtype) -> torch.Tensor:
    """``h_1..h_T`` as ``[B, T, H]`` in ``dtype`` from the projected input ``p [B, T, H]`` (``h0``
    None: zeros); differentiable."""
    return vanilla_loop(cells.get(cell), *(_as(t, dtype) for t in (p, w_h, b_h, h0)))


def loop_fwd(proj, ids, w_h, b_h, ws, cell) -> None:
    """Fills ``ws[:, 1:]`` with ``h_1..h_T`` (``ws[:, 0]`` holds ``h0``)."""
    ws[:, 1:] = states(proj[ids] if ids is not None else proj, w_h, b_h, ws[:, 0], cell, ws.dtype)


def loop_bwd(grad_out, ws, w_h, c, cell) -> None:
    """Fills ``c[:, :T]`` with ``c_t = dz_t @ W_h``, ``dz_t = (g_t + c_{t+1}) * act'(h_t)``
    (``c[:, T]`` holds ``dL/dh_n``)."""
    cell = cells.get(cell)
    w = w_h.to(c.dtype)
    for t in reversed(range(ws.shape[1] - 1)):
        dz = activation_grad(cell, grad_out[:, t] + c[:, t + 1], ws[:, t + 1])
        c[:, t] = dz @ w


def gated_fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, cell, keep_saved=True):
    """The gated cells' forward at the kernels' interface (see `ops/__init__.py`), by the
    reference loop: ``(out, cs, saved)`` (saved whatever ``keep_saved``)."""
    cell, dtype = cells.get(cell), workspace_dtype(w_hh.dtype)
    with torch.no_grad():
        out, cs, saved = gated_loop(cell, *(_as(t, dtype) for t in (q, w_hh, b_hh, h0, c0, w_hr)))
    return out, cs if cs is not None else out.new_empty(0), saved


def gated_bwd(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, cell):
    """The gated cells' backward at the kernels' interface, step by step with the reference's
    pointwise backward: ``(grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0, grad_w_hr)``, None for
    an input that is None."""
    cell, dtype = cells.get(cell), out.dtype
    w, w_r = w_hh.to(dtype), _as(w_hr, dtype)
    T, B = out.shape[:2]
    lstm = cell is cells.LSTM
    h_first = out.new_zeros(B, out.shape[2]) if h0 is None else h0.to(dtype)
    c_first = None if not lstm else out.new_zeros(B, cs.shape[2]) if c0 is None else c0.to(dtype)
    grad_q = torch.empty(q.shape, dtype=dtype, device=q.device)
    grad_w_hh = torch.zeros_like(w)
    grad_b_hh = None if b_hh is None else out.new_zeros(b_hh.shape)
    grad_w_hr = None if w_hr is None else torch.zeros_like(w_r)
    carry_h = torch.zeros_like(h_first)
    carry_c = None if not lstm else torch.zeros_like(c_first)
    for t in reversed(range(T)):
        h_prev = out[t - 1] if t > 0 else h_first
        gh = grad_out[t].to(dtype) + carry_h
        if lstm:
            gc = carry_c if grad_cs is None else carry_c + grad_cs[t].to(dtype)
            if w_r is not None:  # h_t = m_t W_hr^T, m_t = o tanh(c_t)
                grad_w_hr += gh.t() @ (saved[t].chunk(4, dim=1)[3] * torch.tanh(cs[t]))
                gh = gh @ w_r
            da, carry_c = lstm_pointwise_backward(gh, gc, saved[t], cs[t - 1] if t > 0 else c_first, cs[t])
            grad_q[t] = da
            carry_h = da @ w
        else:
            grad_q[t], da, direct = gru_pointwise_backward(gh, saved[t], h_prev)
            carry_h = direct + da @ w
        grad_w_hh += da.t() @ h_prev
        if grad_b_hh is not None:
            grad_b_hh += da.sum(0)
    return grad_q, grad_w_hh, grad_b_hh, carry_h, carry_c, grad_w_hr


def _as(t, dtype):
    return None if t is None else t.to(dtype)
