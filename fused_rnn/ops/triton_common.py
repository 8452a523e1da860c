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
