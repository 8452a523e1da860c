"""Plain PyTorch ground truth: each cell's pointwise maths and step, the recurrences as loops, and
the course's CharLoopModel.

Every fused kernel in this package is tested against these loops; the first-use self-check and
the loop at the bottom of the Triton fallback chain (`ops/loop.py`) call them too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cells
from .cells import Cell


def activation(cell: Cell, z: torch.Tensor) -> torch.Tensor:
    """The cell's state nonlinearity."""
    return torch.relu(z) if cell.activation == "relu" else torch.tanh(z)


def activation_grad(cell: Cell, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``dz = g * act'(z)`` from the activation's output ``h``: as torch.relu's backward (0 where
    ``h <= 0``, ``g`` elsewhere, NaN ``h`` included), or tanh's ``1 - h^2``."""
    return torch.where(h <= 0, 0.0, g) if cell.activation == "relu" else g * (1.0 - h * h)


def cell_step(cell: Cell, h_prev, p_t, w_h, b_h=None):
    """One step ``h_t`` of ``cell`` from ``h_{t-1}`` and the step's projected input ``p_t``:
    ``act((h + relu(p_t)) W^T + b)`` where the input enters before the product, else
    ``act(p_t + h W^T + b)``."""
    if cell.input_before_product:
        return activation(cell, F.linear(h_prev + torch.relu(p_t), w_h, b_h))
    return activation(cell, p_t + F.linear(h_prev, w_h, b_h))


def rnn_reference(x, w_in, b_in, w_h, b_h, h0=None, *, embedding=None):
    """The recurrence ``h_t = tanh(W_h (h_{t-1} + relu(W_in e(x_t) + b_in)) + b_h)``, step by step.

    Same signature and result as :func:`fused_rnn.fused_rnn`: ``x`` is ``[B, T]`` token ids with
    ``embedding [V, E]``, or dense ``[B, T, E]``; returns ``(output [B, T, H], h_n [B, H])``.
    """
    inputs = F.embedding(x, embedding) if embedding is not None else x
    p = F.linear(inputs, w_in, b_in)  # [B, T, H]
    h = p.new_zeros(p.shape[0], p.shape[2]) if h0 is None else h0
    states = []
    for t in range(p.shape[1]):
        h = cell_step(cells.COURSE, h, p[:, t], w_h, b_h)
        states.append(h)
    return torch.stack(states, dim=1), h


class CharLoopModel(nn.Module):
    """The fast.ai course's char-RNN: predicts the next char from the previous ``len(cs)`` chars.

    ``forward(*cs)`` takes one LongTensor ``[B]`` per step and returns ``log_softmax`` scores
    ``[B, vocab_size]`` for the char after the last one. The state starts at zero and follows the
    parameters' device and dtype.
    """

    def __init__(self, vocab_size: int, n_fac: int, n_hidden: int):
        super().__init__()
        self.e = nn.Embedding(vocab_size, n_fac)
        self.l_in = nn.Linear(n_fac, n_hidden)
        self.l_hidden = nn.Linear(n_hidden, n_hidden)
        self.l_out = nn.Linear(n_hidden, vocab_size)

    def forward(self, *cs: torch.Tensor) -> torch.Tensor:
        weight = self.l_hidden.weight
        h = weight.new_zeros(cs[0].shape[0], weight.shape[0])
        for c in cs:
            inp = F.relu(self.l_in(self.e(c)))
            h = torch.tanh(self.l_hidden(h + inp))
        return F.log_softmax(self.l_out(h), dim=-1)


def elman_reference(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, *, nonlinearity="tanh"):
    """``torch.nn.RNN``'s own (Elman) cell, step by step, batch first:
    ``h_t = act(x_t @ W_ih^T + b_ih + h_{t-1} @ W_hh^T + b_hh)``, ``act`` = tanh or relu.

    ``x [B, T, I]``, ``w_ih [H, I]``, ``w_hh [H, H]``, ``b_ih``/``b_hh [H]`` or None, ``h0 [B, H]``
    or None (zeros); returns ``(output [B, T, H], h_n [B, H])``.
    """
    cell = cells.elman(nonlinearity)
    q = F.linear(x, w_ih, b_ih)  # [B, T, H]
    h = q.new_zeros(q.shape[0], q.shape[2]) if h0 is None else h0
    states = []
    for t in range(q.shape[1]):
        h = cell_step(cell, h, q[:, t], w_hh, b_hh)
        states.append(h)
    return torch.stack(states, dim=1), h


def lstm_reference(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, w_hr=None):
    """``torch.nn.LSTM``'s cell, step by step, one layer, one direction, batch first. Gate rows
    in torch's order i, f, g, o of ``w_ih [4H, I]`` and ``w_hh [4H, P]``:
    ``z = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``; ``i, f, o = sigmoid``, ``g = tanh``;
    ``c_t = f c_{t-1} + i g``; ``h_t = o tanh(c_t)``, projected by ``w_hr [P, H]`` when given
    (``proj_size``; else ``P = H``).

    ``h0 [B, P]`` / ``c0 [B, H]`` or None (zeros); returns ``(output [B, T, P], (h_n, c_n))``.
    """
    q = F.linear(x, w_ih, b_ih)  # [B, T, 4H]
    H = w_hh.shape[0] // 4
    P = H if w_hr is None else w_hr.shape[0]
    h = q.new_zeros(q.shape[0], P) if h0 is None else h0
    c = q.new_zeros(q.shape[0], H) if c0 is None else c0
    states = []
    for t in range(q.shape[1]):
        i, f, g, o = (q[:, t] + F.linear(h, w_hh, b_hh)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        states.append(h)
    return torch.stack(states, dim=1), (h, c)


def gru_reference(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None):
    """``torch.nn.GRU``'s cell, step by step, one layer, one direction, batch first. Gate rows in
    torch's order r, z, n of ``w_ih [3H, I]`` and ``w_hh [3H, H]``; ``b_hn`` stays inside the
    reset gate's product: ``n = tanh(q_n + r (h_{t-1} W_hn^T + b_hn))``;
    ``h_t = (1 - z) n + z h_{t-1}``.

    ``h0 [B, H]`` or None (zeros); returns ``(output [B, T, H], h_n [B, H])``.
    """
    q = F.linear(x, w_ih, b_ih)  # [B, T, 3H]
    h = q.new_zeros(q.shape[0], w_hh.shape[1]) if h0 is None else h0
    states = []
    for t in range(q.shape[1]):
        qr, qz, qn = q[:, t].chunk(3, dim=1)
        ar, az, an = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(qr + ar), torch.sigmoid(qz + az)
        n = torch.tanh(qn + r * an)
        h = (1 - z) * n + z * h
        states.append(h)
    return torch.stack(states, dim=1), h
