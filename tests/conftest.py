"""Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter.

TRITON_INTERPRET must be set before fused_rnn's kernels are defined, so it is set here, before
any test module imports fused_rnn.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def device():
    return DEVICE
