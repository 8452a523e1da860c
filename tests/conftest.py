"""Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter.

TRITON_INTERPRET must be set before fused_rnn's kernels are defined, so it is set here, before
any test module imports fused_rnn.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU the Triton paths check themselves on first use (fused_rnn.ops.self_check): which
    # test uses a kernel configuration first would change how many launches a test counts, so the
    # check is off here, and on in the tests that ask for it (the `checked` fixture).
    os.environ.setdefault("FUSED_RNN_SELF_CHECK", "0")
    # torch's modules are the float64 ground truth; cuDNN refuses some of what they do on the CPU
    # (backward in eval mode, a non-contiguous hx) and draws dropout masks its own way, so the
    # tests compare against ATen's own RNN there, as on the CPU.
    torch.backends.cudnn.enabled = False

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Where the triton backend's tensors live in this run: CUDA when there is a GPU, CPU tensors
# through the interpreter (TRITON_INTERPRET=1, the default above without a GPU), else nowhere.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else (
    "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)
TRITON_MISSING = ("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run CPU tensors "
                  "through the interpreter")


def backend_device(backend: str) -> str:
    """The device a test must put its tensors on to run ``backend`` here: CUDA for ``triton``
    when there is a GPU (CPU tensors under the interpreter), CPU for the C++ extension (``cpu``),
    CUDA when present for ``reference`` and ``auto``. Skips the calling test, saying why, where
    the backend cannot run (``triton`` with ``TRITON_INTERPRET=0`` and no GPU)."""
    if backend == "cpu":
        return "cpu"
    if backend == "triton":
        if TRITON_DEVICE is None:
            pytest.skip(TRITON_MISSING)
        return TRITON_DEVICE
    return DEVICE


@pytest.fixture
def checked(monkeypatch):
    """The Triton paths' first-use self-check on for this device (it runs on CUDA only by default),
    nothing checked yet (a test module may override it: test_self_check.py counts the checks)."""
    from fused_rnn.ops import self_check

    monkeypatch.setattr(self_check, "CHECKED_DEVICES", ("cuda", "cpu"))
    monkeypatch.delenv(self_check.ENV, raising=False)
    self_check.reset()
    yield self_check
    self_check.reset()


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
@pytest.fixture(params=["triton", "cpu"])
def kernel(request):
    return Kernel(request.param, backend_device(request.param))


requires_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason=TRITON_MISSING)


# --- the two tiers -------------------------------------------------------------------------------
# `pytest` runs the fast tier: for every backend, cell, kernel family, module, command and the
# notebook, the cheapest tests that fail when that path breaks (a few minutes on 2 cores).
# Tests marked `exhaustive` (sweeps over shapes, dtypes and grids, full-mode gradchecks, every
# command-line edge, builds and compiles) run with `--tier exhaustive`; `--tier all` runs both.
exhaustive = pytest.mark.exhaustive


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("fast", "exhaustive", "all"), default="fast",
                     help="which tests run: the fast tier (default), the exhaustive tier "
                          "(tests marked 'exhaustive'), or all of them")


def pytest_collection_modifyitems(config, items):
    tier = config.getoption("--tier")
    if tier == "all":
        return
    want_exhaustive = tier == "exhaustive"
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("exhaustive") is not None) == want_exhaustive else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def tiered(values, fast, ids=None, *, several_names=False):
    """``values`` for ``pytest.mark.parametrize``, those not in ``fast`` marked ``exhaustive``
    (``several_names``: each value is a tuple of the values of several argument names)."""
    return [pytest.param(*(v if several_names else (v,)), marks=() if v in fast else exhaustive,
                         id=ids(v) if callable(ids) else None) for v in values]
