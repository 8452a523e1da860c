"""What the Triton kernel files share: whether the interpreter runs them (read once, before any
kernel is defined) and the gated kernels' addressing of the state before a step."""
from __future__ import annotations

import os

import triton
import triton.language as tl  # noqa: F401 (the interpreter patches the tl a jit function sees)

# The interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs kernels on CPU
# tensors; the kernel modules are imported lazily so the variable can be set up to first use.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rows_before(first_ptr, seq_ptr, t, B, rows64, W):
    # Row pointers of a state before step t: the initial state ([B, W]) at t = 0, else step
    # t-1's row of the time-major sequence ([T, B, W]). No copy of the sequence with the initial
    # state in front.
    if t == 0:
        ptrs = first_ptr + rows64 * W
    else:
        ptrs = seq_ptr + ((t - 1) * B + rows64) * W
    return ptrs
