"""Each cell's pointwise maths in Triton (`cells.py` has the specs), written once for both kernel
families: the input that enters before the product, the state's activation and its gradient.
``CELL`` is the cell's name, a ``tl.constexpr``: each kernel is compiled for one cell."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _exp_parts(y):
    # e^y = s (1 + p) for fp32 y in [-87.5, 0] without the GPU's exp (ex2.approx of y log2(e),
    # whose error grows with |y|: ~40 ulps at y = -87): y = k ln2 + r, |r| <= ln2 / 2 (k from
    # the 1.5 * 2^23 rounding trick, ln2 in two parts so k ln2 is exact), s = 2^k from the
    # exponent bits, p = expm1(r) by its Taylor series to r^8 (the next term is below 0.2 ulp).
    # The same operations in the interpreter and on a GPU; NaN passes to p.
    j = y * 1.4426950408889634 + 12582912.0
    kf = j - 12582912.0
    r = (y - kf * 0.693145751953125) - kf * 1.428606765330187e-06
    p = r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (
        1.0 / 720.0 + r * (1.0 / 5040.0 + r * (1.0 / 40320.0))))))))
    s = ((j.to(tl.int32, bitcast=True) - 0x4B400000 + 127) << 23).to(tl.float32, bitcast=True)
    return s, p


@triton.jit
def _tanh(x):
    # fp32: (1 - e) / (1 + e), e = e^{-2|x|} = s (1 + p); as (1 - s - s p) / (1 + s + s p) nothing
    # cancels (s = 1 below |x| = 0.17, where the numerator is -p), so no series branch. |x| is
    # clamped at 9.5, where tanh rounds to 1 (NaN passes). The GPU's `/` (within 2 ulps, not
    # IEEE's div_rn: its slow path took registers enough to cost the LSTM's persistent forward a
    # program per SM). fp64 (tests; a GPU's fp64 exp is libdevice's): from exp, with the odd
    # Taylor series below 1e-3.
    ax = tl.abs(x)
    if x.dtype == tl.float64:
        e = tl.exp(-2.0 * ax)
        x2 = ax * ax
        y = tl.where(ax < 1e-3, ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0))), (1.0 - e) / (1.0 + e))
    else:
        s, p = _exp_parts(-2.0 * tl.where(ax > 9.5, 9.5, ax).to(tl.float32))
        sp = s * p
        y = (((1.0 - s) - sp) / ((1.0 + s) + sp)).to(x.dtype)
    return tl.where(x < 0, -y, y)


@triton.jit
def _input_before_product(a, p):
    # The course's cell: a_t = h_{t-1} + relu(p_t), the product's input (NaN in p passes, as in
    # torch.relu).
    return a + tl.where(p < 0.0, 0.0, p)


@triton.jit
def _activation(x, CELL: tl.constexpr):
    # The state's activation: relu for "elman_relu" (NaN passes through, as in torch.relu), tanh
    # for the others.
    if CELL == "elman_relu":
        y = tl.where(x < 0.0, 0.0, x)
    else:
        y = _tanh(x)
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
    # From e = e^{-|x|}: 1 / (1 + e) for x >= 0, e / (1 + e) below, as relatively accurate as e
    # (1 - 1 / (1 + e^-x) would cancel to 0). fp32 through _exp_parts (0 below -87.5, where the
    # result is subnormal); fp64 from exp. NaN passes.
    ax = tl.abs(x)
    if x.dtype == tl.float64:
        e = tl.exp(-ax)
    else:
        s, p = _exp_parts(-tl.where(ax > 87.5, 87.5, ax).to(tl.float32))
        e = tl.where(ax > 87.5, 0.0, s + s * p)
    r = 1.0 / (1.0 + e)
    return tl.where(x >= 0.0, r, e * r).to(x.dtype)


@triton.jit
def _gated_step(a0, a1, a2, a3, x0, x1, x2, x3, prev, CELL: tl.constexpr):
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
        s2 = _tanh(a2 + x2)
        s3 = _sigmoid(a3 + x3)
        c = s1 * prev + s0 * s2
        new = s3 * _tanh(c)
    else:
        s0 = _sigmoid(x0 + a0)
        s1 = _sigmoid(x1 + a1)
        s2 = _tanh(x2 + s0 * a2)  # b_hn sits inside the reset gate
        s3 = a2
        new = (1.0 - s1) * s2 + s1 * prev
        c = new
    return new, c, s0, s1, s2, s3


@triton.jit
def _gated_step_backward(gh, gc, s0, s1, s2, s3, prev, c, CELL: tl.constexpr):
    # The pointwise backward of _gated_step (design notes 2b) for a tile of units: from the
    # gradient gh at `new` (the LSTM's m_t), the LSTM's gc at c_t (carry plus any grad at c_t),
    # the saved s0..s3, the previous state `prev` and the LSTM's c_t. Returns (d0, d1, d2, d3,
    # share): the gradients at q_t's gate rows (the GRU's d3 = en * r, its gradient at a_n) and
    # the share carried to the previous state outside the product (the LSTM's dc * f into
    # c_{t-1}; the GRU's gh * z into h_{t-1}). gc and c are unused by the GRU.
    if CELL == "lstm":
        tc = _tanh(c)
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
