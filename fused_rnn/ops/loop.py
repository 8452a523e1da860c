"""The reference loop at the kernels' interface: each cell's step from `reference.py` in plain
PyTorch. It is the bottom of the Triton fallback chain (persistent -> blocked -> this), answering
when no kernel path passed its first-use self-check, and the differentiable recomputation behind
the fused backends' double backward (`recurrence_op.py`)."""
from __future__ import annotations

import torch

from .. import cells
from ..reference import activation_grad, cell_step


def states(p, w_h, b_h, h0, cell, dtype) -> torch.Tensor:
    """``h_1..h_T`` as ``[B, T, H]`` in ``dtype`` from the projected input ``p [B, T, H]`` (``h0``
    None: zeros); differentiable."""
    cell = cells.get(cell)
    p, w = p.to(dtype), w_h.to(dtype)
    b = None if b_h is None else b_h.to(dtype)
    h = p.new_zeros(p.shape[0], p.shape[2]) if h0 is None else h0.to(dtype)
    out = []
    for t in range(p.shape[1]):
        h = cell_step(cell, h, p[:, t], w, b)
        out.append(h)
    return torch.stack(out, dim=1)


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
