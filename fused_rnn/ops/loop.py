"""The "reference" backend at the kernels' interface: each cell's step from `reference.py` in a
plain PyTorch loop over the Triton launchers' workspaces. The bottom of the Triton fallback chain
(persistent -> blocked -> this), answering when no kernel path passed its first-use self-check."""
from __future__ import annotations

from .. import cells
from ..reference import activation_grad, cell_step


def loop_fwd(proj, ids, w_h, b_h, ws, cell) -> None:
    """Fills ``ws[:, 1:]`` with ``h_1..h_T`` (``ws[:, 0]`` holds ``h0``)."""
    cell = cells.get(cell)
    p = (proj[ids] if ids is not None else proj).to(ws.dtype)
    w, b = w_h.to(ws.dtype), None if b_h is None else b_h.to(ws.dtype)
    for t in range(ws.shape[1] - 1):
        ws[:, t + 1] = cell_step(cell, ws[:, t], p[:, t], w, b)


def loop_bwd(grad_out, ws, w_h, c, cell) -> None:
    """Fills ``c[:, :T]`` with ``c_t = dz_t @ W_h``, ``dz_t = (g_t + c_{t+1}) * act'(h_t)``
    (``c[:, T]`` holds ``dL/dh_n``)."""
    cell = cells.get(cell)
    w = w_h.to(c.dtype)
    for t in reversed(range(ws.shape[1] - 1)):
        dz = activation_grad(cell, grad_out[:, t] + c[:, t + 1], ws[:, t + 1])
        c[:, t] = dz @ w
