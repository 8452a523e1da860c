"""The Triton kernels' first-use self-check: each kernel path answers only after it matched the reference.

A Triton kernel path (cell x kernel family x dtype x padded H, with the tiling and the compile-time
switches it runs with) answers its first real call in a process only after it has run once on a
small problem of the same tiling and matched the float64 reference loop (`rnn_reference`),
forward and every gradient. A mismatch beyond the dtype's tolerance, NaN (a barrier timeout
writes NaN), or an exception disables that path for the process with a `SelfCheckWarning` naming
it; the launcher then tries the next family down: persistent -> blocked -> the plain loop
(`loop.py`).
`fused_rnn.backends()` reports every path checked and its result.

Cost: one small forward+backward (T = 4 steps, at most 33 batch rows) and one host sync per path
per process, never per call; the kernels it compiles are those the call itself needs (same
specialisation). On CUDA only (the Triton interpreter runs the kernels the tests check anyway);
``FUSED_RNN_SELF_CHECK=0`` skips it. Skipped too while a CUDA graph is being captured (a check
cannot sync there; the warm-up call before a capture has normally run it).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from ..cells import Cell
from ..reference import elman_reference, rnn_reference

ENV = "FUSED_RNN_SELF_CHECK"
# Device types whose first calls are checked (tests add "cpu" to check through the interpreter).
CHECKED_DEVICES = ("cuda",)
# Max |got - want| / max |want| allowed per output and gradient, by the precision the kernel runs.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "tf32": 3e-2, "float16": 2e-2, "bfloat16": 5e-2}
CHECK_STEPS = 4
CHECK_MAX_ROWS = 33  # three 16-row batch blocks, the last ragged


class SelfCheckWarning(RuntimeWarning):
    """A Triton kernel path failed its first-use self-check and is off for this process."""


_lock = threading.RLock()
_results = {}  # path -> None (passed) or the reason it failed
_forced = threading.local()


def enabled(device: torch.device) -> bool:
    if os.environ.get(ENV, "1").strip() == "0" or device.type not in CHECKED_DEVICES:
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def describe(path: tuple) -> str:
    return " ".join(str(part) for part in path)


def summary() -> str:
    """Every path checked in this process and its result, for `fused_rnn.backends()`."""
    with _lock:
        return "; ".join(f"{describe(p)}: {'passed' if r is None else 'FAILED (' + r + ')'}"
                         for p, r in _results.items())


def reset() -> None:
    """Forget every result (for tests)."""
    with _lock:
        _results.clear()


def forced():
    """The (family, plan) a running check forces on the launchers of this thread, or None."""
    return getattr(_forced, "choice", None)


@contextlib.contextmanager
def _forcing(choice):
    _forced.choice = choice
    try:
        yield
    finally:
        _forced.choice = None


def passes(path: tuple, device: torch.device, run_check) -> bool:
    """Whether ``path`` may answer calls: checked once per process (``run_check()`` returns None
    or why it failed; an exception fails it too), then the stored result."""
    if not enabled(device):
        return True
    with _lock:
        if path not in _results:
            try:
                reason = run_check()
            except Exception as exc:  # compile or launch failure: the path cannot answer
                first_line = (str(exc).strip().splitlines() or [""])[0]
                reason = f"raised {type(exc).__name__}: {first_line}"
            _results[path] = reason
            if reason is not None:
                warnings.warn(f"fused_rnn: Triton self-check failed for {describe(path)}: {reason}; "
                              f"this path is off for the process, the next one down answers "
                              f"({ENV}=0 skips the check)", SelfCheckWarning, stacklevel=5)
        return _results[path] is None


def check(choice, precision: str, fwd, bwd, *, B, H, dtype, device, tokens, has_bias,
          allow_tf32, cell: Cell, broken=lambda: None):
    """Runs the launchers ``fwd``/``bwd`` (`rnn_fwd`/`rnn_bwd`) with ``choice`` forced on a small
    problem against the float64 reference loop of ``cell`` (`rnn_reference`, or `elman_reference`
    where the input enters after the product: ``proj`` is q, dense, without ``b_h``); None if every
    output and gradient is within
    ``TOLERANCE[precision]``, else why not. ``broken()`` may report a failure the launchers
    absorbed (a persistent barrier timeout they reran on the blocked kernels)."""
    B, T, V = min(B, CHECK_MAX_ROWS), CHECK_STEPS, 7
    shapes = dict(proj=(V, H) if tokens else (B, T, H), ids=(B, T), w_h=(H, H), b_h=(H,), h0=(B, H),
                  grad_out=(B, T, H), grad_h_n=(B, H))
    scales = dict(w_h=1.5 * H ** -0.5, b_h=0.5, h0=0.9)
    sizes = [torch.Size(shape).numel() for shape in shapes.values()]
    g = torch.Generator(device=device).manual_seed(1234)  # drawn on the device: no copy
    uniform = torch.rand(sum(sizes), generator=g, device=device, dtype=torch.float64)
    values = {}
    for (name, shape), u in zip(shapes.items(), uniform.split(sizes)):
        if name == "ids":
            ids = (u.view(shape) * V).long().clamp_max(V - 1) if tokens else None
        else:  # float64 values that the kernels' dtype holds exactly
            values[name] = ((u.view(shape) * 2 - 1) * scales.get(name, 1.0)).to(dtype).double()
    proj, w_h, b_h, h0, grad_out, grad_h_n = (values[k] for k in ("proj", "w_h", "b_h", "h0", "grad_out", "grad_h_n"))

    # float64 reference: the projection enters as the embedding (or dense input) of an identity
    # input layer, exact in float64. torch.func: the launchers run inside a custom op, below
    # autograd, where torch.autograd cannot record.
    eye = torch.eye(H, dtype=torch.float64, device=device)

    def reference(proj, w_h, *rest):
        b_h, h0 = rest if has_bias else (None, rest[0])
        if not cell.input_before_product:  # h_t = act(q_t + h_{t-1} W^T): q through an identity input layer
            return elman_reference(proj, eye, w_h, None, None, h0, nonlinearity=cell.activation)
        if tokens:
            return rnn_reference(ids, eye, None, w_h, b_h, h0, embedding=proj)
        return rnn_reference(proj, eye, None, w_h, b_h, h0)

    primals = (proj, w_h) + ((b_h,) if has_bias else ()) + (h0,)
    (out64, h_n64), vjp = torch.func.vjp(reference, *primals)
    want = [out64, *vjp((grad_out, grad_h_n))]

    def low(t):
        return None if t is None else t.to(dtype).contiguous()

    with _forcing(choice):
        ws = fwd(low(proj), ids, low(w_h), low(b_h) if has_bias else None, low(h0), allow_tf32, cell.name)
        grads = bwd(grad_out.to(ws.dtype), low(grad_h_n), ws,
                    low(h0), low(proj), ids, low(w_h), has_bias, allow_tf32, cell.name)
    grad_proj, grad_w_h, grad_b_h, grad_h0 = grads
    got = [ws[:, 1:], grad_proj, grad_w_h] + ([grad_b_h] if has_bias else []) + [grad_h0]
    names = ["output", "grad_proj", "grad_w_h"] + (["grad_b_h"] if has_bias else []) + ["grad_h0"]
    errors = torch.stack([(a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)
                          for a, b in zip(got, want)]).tolist()  # the check's one host sync
    reason = broken()
    if reason is not None:
        return reason
    tolerance = TOLERANCE[precision]
    bad = [f"{n} relative error {e:.1e}" for n, e in zip(names, errors) if not e <= tolerance]
    return f"{', '.join(bad)} (tolerance {tolerance:.0e})" if bad else None
