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
