"""Triton JIT helpers that several kernel files share (kept here so kernel files import down,
never each other), and whether the Triton interpreter runs the kernels."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs kernels on CPU
# tensors; the kernel modules are imported lazily so the variable can be set up to first use.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


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
def _activation(x, CELL: tl.constexpr, TANH_SMALL: tl.constexpr):
    # The cell's activation (ops.CELLS): relu for "elman_relu" (NaN passes through, as in
    # torch.relu), tanh for the others.
    if CELL == "elman_relu":
        y = tl.where(x < 0.0, 0.0, x)
    else:
        y = _tanh(x, TANH_SMALL)
    return y


@triton.jit
def _activation_grad(g, h, CELL: tl.constexpr):
    # dz = g * act'(z) from the activation's output h: relu's h > 0 (g passes where h is NaN,
    # as in torch.relu's backward), tanh's 1 - h^2. The relu form as a subtraction: the plain
    # select spills 16 bytes in the persistent backward at H=300 (sm_90); they differ only where
    # g is inf or NaN and h <= 0.
    if CELL == "elman_relu":
        dz = g - tl.where(h <= 0.0, g, 0.0)
    else:
        dz = g * (1.0 - h * h)
    return dz
