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


class Kernel:
    """A fused backend and the device its tensors live on."""

    def __init__(self, backend, device):
        self.backend, self.device = backend, device

    def __repr__(self):
        return self.backend


# The one parity/gradient/bad-input suite runs over every fused backend.
@pytest.fixture(params=[Kernel("triton", DEVICE), Kernel("cpu", "cpu")], ids=repr)
def kernel(request):
    return request.param
