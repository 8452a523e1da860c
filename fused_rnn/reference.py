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


def vanilla_loop(cell: Cell, p, w_h, b_h=None, h0=None):
    """The states ``h_1..h_T`` ``[B, T, H]`` of a one-gate ``cell`` from the projected input
    ``p [B, T, H]`` (``h0`` None: zeros), step by step."""
    h = p.new_zeros(p.shape[0], p.shape[2]) if h0 is None else h0
    states = []
    for t in range(p.shape[1]):
        h = cell_step(cell, h, p[:, t], w_h, b_h)
        states.append(h)
    return torch.stack(states, dim=1)


def rnn_reference(x, w_in, b_in, w_h, b_h, h0=None, *, embedding=None):
    """The recurrence ``h_t = tanh(W_h (h_{t-1} + relu(W_in e(x_t) + b_in)) + b_h)``, step by step.

    Same signature and result as :func:`fused_rnn.fused_rnn`: ``x`` is ``[B, T]`` token ids with
    ``embedding [V, E]``, or dense ``[B, T, E]``; returns ``(output [B, T, H], h_n [B, H])``.
    """
    inputs = F.embedding(x, embedding) if embedding is not None else x
    states = vanilla_loop(cells.COURSE, F.linear(inputs, w_in, b_in), w_h, b_h, h0)
    return states, states[:, -1]


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
    states = vanilla_loop(cells.elman(nonlinearity), F.linear(x, w_ih, b_ih), w_hh, b_hh, h0)
    return states, states[:, -1]


def lstm_pointwise(z, c_prev):
    """The LSTM's pointwise update from the pre-activations ``z [B, 4H]`` (gate rows i, f, g, o)
    and ``c_{t-1}``: ``(m_t, c_t, gates)`` with ``m_t = o tanh(c_t)`` (``h_t`` before any
    projection) and ``gates = [i, f, g, o]`` activated, ``[B, 4H]``."""
    zi, zf, zg, zo = z.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo)
    c = f * c_prev + i * g
    return o * torch.tanh(c), c, torch.cat([i, f, g, o], dim=1)


def gru_pointwise(q_t, a, h_prev):
    """The GRU's pointwise update from the input's pre-activations ``q_t [B, 3H]`` (rows r, z, n,
    ``b_ih`` in them) and the product's ``a = h_{t-1} W_hh^T + b_hh``: ``(h_t, saved)`` with
    ``saved = [r, z, n, a_n]``, ``[B, 4H]``."""
    qr, qz, qn = q_t.chunk(3, dim=1)
    ar, az, an = a.chunk(3, dim=1)
    r, z = torch.sigmoid(qr + ar), torch.sigmoid(qz + az)
    n = torch.tanh(qn + r * an)
    return (1 - z) * n + z * h_prev, torch.cat([r, z, n, an], dim=1)


def lstm_pointwise_backward(gh, gc, gates, c_prev, c):
    """The LSTM's pointwise backward (design notes, section 2b): from the gradients at ``m_t``
    (``gh``) and ``c_t`` (``gc``), the saved ``gates``, ``c_{t-1}`` and ``c_t``, returns ``(dz [B, 4H],
    the gradient carried to c_{t-1})``; ``dz`` is the gradient at the pre-activations."""
    i, f, g, o = gates.chunk(4, dim=1)
    tc = torch.tanh(c)
    do = gh * tc
    dc = gc + gh * o * (1 - tc * tc)
    dz = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), do * o * (1 - o)], dim=1)
    return dz, dc * f


def gru_pointwise_backward(gh, saved, h_prev):
    """The GRU's pointwise backward (design notes, section 2b): from the gradient at ``h_t``, the
    saved ``[r, z, n, a_n]`` and ``h_{t-1}``, returns ``(dq [B, 3H], da [B, 3H], gh z)``: the
    gradients at ``q_t`` and at the product ``a``, and the share carried straight to ``h_{t-1}``."""
    r, z, n, an = saved.chunk(4, dim=1)
    en = gh * (1 - z) * (1 - n * n)
    ez = gh * (h_prev - n) * z * (1 - z)
    er = en * an * r * (1 - r)
    return torch.cat([er, ez, en], dim=1), torch.cat([er, ez, en * r], dim=1), gh * z


def gated_loop(cell: Cell, q, w_hh, b_hh=None, h0=None, c0=None, w_hr=None):
    """The LSTM or GRU over time-major ``q [T, B, G*H]`` (``x W_ih^T`` plus the biases that fold
    into it: both for the LSTM, ``b_ih`` for the GRU, whose ``b_hh`` enters with the product).
    Returns ``(out [T, B, P], cs [T, B, H] (the LSTM's c_1..c_T; None for the GRU), saved
    [T, B, 4H])``; ``h0`` / ``c0`` None: zeros."""
    T, B = q.shape[:2]
    H = w_hh.shape[0] // cell.gates
    h = q.new_zeros(B, w_hh.shape[1]) if h0 is None else h0
    c = q.new_zeros(B, H) if c0 is None else c0
    outs, cs, saved = [], [], []
    for t in range(T):
        a = F.linear(h, w_hh, b_hh)
        if cell is cells.LSTM:
            m, c, kept = lstm_pointwise(q[t] + a, c)
            h = m if w_hr is None else F.linear(m, w_hr)
            cs.append(c)
        else:
            h, kept = gru_pointwise(q[t], a, h)
        outs.append(h)
        saved.append(kept)
    return torch.stack(outs), (torch.stack(cs) if cs else None), torch.stack(saved)


def lstm_reference(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, w_hr=None):
    """``torch.nn.LSTM``'s cell, step by step, one layer, one direction, batch first. Gate rows
    in torch's order i, f, g, o of ``w_ih [4H, I]`` and ``w_hh [4H, P]``:
    ``z = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``; ``i, f, o = sigmoid``, ``g = tanh``;
    ``c_t = f c_{t-1} + i g``; ``h_t = o tanh(c_t)``, projected by ``w_hr [P, H]`` when given
    (``proj_size``; else ``P = H``).

    ``h0 [B, P]`` / ``c0 [B, H]`` or None (zeros); returns ``(output [B, T, P], (h_n, c_n))``.
    """
    q = F.linear(x.transpose(0, 1), w_ih, b_ih)  # [T, B, 4H]
    out, cs, _ = gated_loop(cells.LSTM, q, w_hh, b_hh, h0, c0, w_hr)
    return out.transpose(0, 1), (out[-1], cs[-1])


def gru_reference(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None):
    """``torch.nn.GRU``'s cell, step by step, one layer, one direction, batch first. Gate rows in
    torch's order r, z, n of ``w_ih [3H, I]`` and ``w_hh [3H, H]``; ``b_hn`` stays inside the
    reset gate's product: ``n = tanh(q_n + r (h_{t-1} W_hn^T + b_hn))``;
    ``h_t = (1 - z) n + z h_{t-1}``.

    ``h0 [B, H]`` or None (zeros); returns ``(output [B, T, H], h_n [B, H])``.
    """
    q = F.linear(x.transpose(0, 1), w_ih, b_ih)  # [T, B, 3H]
    out, _, _ = gated_loop(cells.GRU, q, w_hh, b_hh, h0)
    return out.transpose(0, 1), out[-1]
