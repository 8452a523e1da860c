"""Whether the Triton interpreter runs the kernels (read once, before any kernel is defined)."""
from __future__ import annotations

import os

# The interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs kernels on CPU
# tensors; the kernel modules are imported lazily so the variable can be set up to first use.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
