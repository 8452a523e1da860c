"""Each cell's pointwise maths in Triton (`cells.py` has the specs), written once for both kernel
families: the input that enters before the product, the state's activation and its gradient.
``CELL`` is the cell's name, a ``tl.constexpr``: each kernel is compiled for one cell."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def tanh_small(state_dtype: torch.dtype) -> float:
    """``_tanh``'s switch to its Taylor series for states of ``state_dtype`` (fp32 or fp64)."""
    return 1e-3 if state_dtype == torch.float64 else 0.0625


@triton.jit
def _tanh(x, SMALL: tl.constexpr):
    # tanh from exp (libdevice is not available to the interpreter). exp(-2|x|) cannot overflow;
    # below SMALL the odd Taylor series avoids the cancellation in 1 - e.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)))
    y = tl.where(ax < SMALL, small, big)
    return tl.where(x < 0, -y, y)


@triton.jit
def _input_before_product(a, p):
    # The course's cell: a_t = h_{t-1} + relu(p_t), the product's input (NaN in p passes, as in
    # torch.relu).
    return a + tl.where(p < 0.0, 0.0, p)


@triton.jit
def _activation(x, CELL: tl.constexpr, TANH_SMALL: tl.constexpr):
    # The state's activation: relu for "elman_relu" (NaN passes through, as in torch.relu), tanh
    # for the others.
    if CELL == "elman_relu":
        y = tl.where(x < 0.0, 0.0, x)
    else:
        y = _tanh(x, TANH_SMALL)
    return y


@triton.jit
def _activation_grad(g, h, CELL: tl.constexpr):
    # dz = g * act'(z) from the activation's output h: as torch.relu's backward (0 where h <= 0,
    # g elsewhere, NaN h included), tanh's 1 - h^2.
    if CELL == "elman_relu":
        # As a subtraction, then the one select where it is NaN (g inf or NaN where h <= 0): the
        # plain select alone spills 16 bytes in the persistent backward at H=300 (sm_90, 8 warps);
        # this form compiles to 110 registers, no spill.
        dz = g - tl.where(h <= 0.0, g, 0.0)
        dz = tl.where(dz == dz, dz, tl.where(h <= 0.0, 0.0, g))
    else:
        dz = g * (1.0 - h * h)
    return dz


# ----------------------------------------------------------------------------------------------
# The gated cells (`triton_gated.py`): the LSTM (gate rows i, f, g, o) and GRU (r, z, n).


@triton.jit
def _sigmoid(x):
    # 1 / (1 + e^-x) for x >= 0 and e^x / (1 + e^x) below, from e = exp(-|x|): never overflows,
    # and for large negative x the result is e * (1 / (1 + e)), as relatively accurate as exp
    # itself (1 - 1 / (1 + e^-x) would cancel to 0). NaN passes.
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, r, e * r)


@triton.jit
def _gated_step(a0, a1, a2, a3, x0, x1, x2, x3, prev, CELL: tl.constexpr, TANH_SMALL: tl.constexpr):
    # One step's pointwise update for a tile of hidden units, from the product's gate tiles a
    # (h_{t-1} W_hh^T, plus b_hh where the cell has it) and q_t's x, and the previous state
    # `prev` of those units (the LSTM's c_{t-1}, the GRU's h_{t-1}). Returns (new, c, s0..s3):
    # the new state (the LSTM's m_t = o tanh(c_t), before any projection; the GRU's h_t), the
    # LSTM's c_t (the GRU: `new` again, unused), and what the backward reads (i, f, g, o; r, z,
    # n, a_n). a3, x3: the LSTM's o rows (unused by the GRU). Same order of operations as
    # reference.lstm_pointwise / gru_pointwise.
    if CELL == "lstm":
        s0 = _sigmoid(a0 + x0)
        s1 = _sigmoid(a1 + x1)
        s2 = _tanh(a2 + x2, TANH_SMALL)
        s3 = _sigmoid(a3 + x3)
        c = s1 * prev + s0 * s2
        new = s3 * _tanh(c, TANH_SMALL)
    else:
        s0 = _sigmoid(x0 + a0)
        s1 = _sigmoid(x1 + a1)
        s2 = _tanh(x2 + s0 * a2, TANH_SMALL)  # b_hn sits inside the reset gate
        s3 = a2
        new = (1.0 - s1) * s2 + s1 * prev
        c = new
    return new, c, s0, s1, s2, s3


@triton.jit
def _gated_step_backward(gh, gc, s0, s1, s2, s3, prev, c, CELL: tl.constexpr, TANH_SMALL: tl.constexpr):
    # The pointwise backward of _gated_step (design notes 2b) for a tile of units: from the
    # gradient gh at `new` (the LSTM's m_t), the LSTM's gc at c_t (carry plus any grad at c_t),
    # the saved s0..s3, the previous state `prev` and the LSTM's c_t. Returns (d0, d1, d2, d3,
    # share): the gradients at q_t's gate rows (the GRU's d3 = en * r, its gradient at a_n) and
    # the share carried to the previous state outside the product (the LSTM's dc * f into
    # c_{t-1}; the GRU's gh * z into h_{t-1}). gc and c are unused by the GRU.
    if CELL == "lstm":
        tc = _tanh(c, TANH_SMALL)
        dc = gc + gh * s3 * (1.0 - tc * tc)
        d0 = dc * s2 * s0 * (1.0 - s0)
        d1 = dc * prev * s1 * (1.0 - s1)
        d2 = dc * s0 * (1.0 - s2 * s2)
        d3 = gh * tc * s3 * (1.0 - s3)
        share = dc * s1
    else:
        d2 = gh * (1.0 - s1) * (1.0 - s2 * s2)
        d1 = gh * (prev - s2) * s1 * (1.0 - s1)
        d0 = d2 * s3 * s0 * (1.0 - s0)
        d3 = d2 * s0
        share = gh * s1
    return d0, d1, d2, d3, share
