"""The public function: input checks, backend dispatch, the input projection, and the fused
recurrence registered as PyTorch custom ops with autograd."""
from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

from .ops import cpu_ext, elman_q_time_major, output_view, states_shape, workspace_dtype
from .reference import elman_reference, rnn_reference

BACKENDS = ("auto", "triton", "cpu", "reference")
NONLINEARITIES = ("tanh", "relu")


def check_backend(backend: str) -> str:
    """Refuses an unknown backend name (modules call it when they are built, not at first use)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)  # what F.embedding and the kernels read; others are cast
CPU_DTYPES = (torch.float32, torch.float64)


class BackendInfo(NamedTuple):
    available: bool
    devices: tuple  # device types it runs on
    note: str  # why it is (not) available


def _triton_module():
    """The Triton op module, or the exception that stops it from importing."""
    try:
        return importlib.import_module("fused_rnn.ops.triton_rnn")
    except Exception as exc:  # ImportError, or a broken triton install
        return exc


@torch.compiler.assume_constant_result
def _triton_import_error() -> Optional[str]:
    """Why the Triton op module does not import, or None. A constant to torch.compile: backend
    resolution runs inside a traced fused_rnn, where importlib cannot be traced."""
    mod = _triton_module()
    return f"{type(mod).__name__}: {mod}" if isinstance(mod, Exception) else None


def backends() -> dict:
    """What each backend needs and whether it can run here: ``{name: BackendInfo}``.

    Asking about ``"cpu"`` builds the C++ extension if it was not built at install time.
    """
    info = {"reference": BackendInfo(True, ("cpu", "cuda"), "plain PyTorch loop, any device, any dtype")}
    reason = cpu_ext.unavailable_reason()
    info["cpu"] = BackendInfo(reason is None, ("cpu",),
                              reason or "C++ extension loaded; float32 and float64")
    mod = _triton_module()
    if isinstance(mod, Exception):
        info["triton"] = BackendInfo(False, (), f"triton does not import: {mod}")
    else:
        devices = ("cuda",) + (("cpu",) if mod.INTERPRET else ())
        cuda = torch.cuda.is_available()
        note = "CUDA is available" if cuda else "no CUDA device"
        if mod.INTERPRET:
            note += "; TRITON_INTERPRET=1: CPU tensors run through the (slow) interpreter"
        if mod.self_check.summary():
            note += f"; first-use self-check: {mod.self_check.summary()}"
        info["triton"] = BackendInfo(cuda or mod.INTERPRET, devices, note)
    return info


_warned_cpu_fallback = False


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: "triton", "cpu" or "reference"; raises for an impossible ask."""
    global _warned_cpu_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "reference" if _triton_import_error() is not None else "triton"
        if device.type == "cpu" and dtype in CPU_DTYPES:
            reason = cpu_ext.unavailable_reason()
            if reason is None:
                return "cpu"
            if not _warned_cpu_fallback:
                warnings.warn(f"fused_rnn: falling back to the reference loop: {reason}", stacklevel=3)
                _warned_cpu_fallback = True
        return "reference"
    if backend == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' runs on CPU tensors, got {device.type} tensors; "
                               f"use backend='auto'")
        if dtype not in CPU_DTYPES:
            raise RuntimeError(f"backend='cpu' supports float32 and float64, got {dtype}; "
                               f"use backend='reference' or convert the inputs")
        cpu_ext.load()  # raises RuntimeError saying how to fix a failed build
    elif backend == "triton" and _triton_import_error() is not None:
        raise RuntimeError(f"backend='triton' needs triton ({_triton_import_error()}); pip install triton")
    return backend


def _kernels(backend: str):
    """The module with ``rnn_fwd`` and ``rnn_bwd`` for a fused backend."""
    return cpu_ext if backend == "cpu" else _triton_module()


# The fused recurrence as PyTorch custom ops, so that torch.compile(fullgraph=True) can trace
# through it (the fake implementations give it the output shapes) and autograd sees one node.
#
# fused_rnn::recurrence(proj, ids, w_h, b_h, h0, backend, allow_tf32, cell) -> (states, h_n)
#   states (fp32; fp64 for fp64 inputs) in the backend's layout (ops.states_shape); the public
#   function returns ops.output_view(states) as the [B, T, H] output; h_n [B, H] in the inputs'
#   dtype. cell (ops.CELLS): "course", or nn.RNN's own "elman_tanh" / "elman_relu", whose proj
#   is q with both biases in it (no ids, no b_h), in the layout of ops.elman_q_time_major.


def _batch_and_steps(proj, ids, backend, cell):
    if ids is not None:
        return ids.shape
    return proj.shape[1::-1] if elman_q_time_major(backend, cell) else proj.shape[:2]


@torch.library.custom_op("fused_rnn::recurrence", mutates_args=())
def _recurrence(proj: torch.Tensor, ids: Optional[torch.Tensor], w_h: torch.Tensor,
                b_h: Optional[torch.Tensor], h0: Optional[torch.Tensor], backend: str,
                allow_tf32: bool, cell: str) -> Tuple[torch.Tensor, torch.Tensor]:
    states = _kernels(backend).rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32, cell)
    return states, output_view(states, backend)[:, -1].to(w_h.dtype, copy=True)


@_recurrence.register_fake
def _(proj, ids, w_h, b_h, h0, backend, allow_tf32, cell):
    B, T = _batch_and_steps(proj, ids, backend, cell)
    H = w_h.shape[0]
    states = w_h.new_empty(states_shape(backend, B, T, H), dtype=workspace_dtype(w_h.dtype))
    return states, w_h.new_empty((B, H))


@torch.library.custom_op("fused_rnn::recurrence_backward", mutates_args=())
def _recurrence_backward(grad_states: torch.Tensor, grad_h_n: torch.Tensor, states: torch.Tensor,
                         h0: Optional[torch.Tensor], proj: torch.Tensor, ids: Optional[torch.Tensor],
                         w_h: torch.Tensor, has_bias: bool, backend: str, allow_tf32: bool, cell: str
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_proj, grad_w_h, grad_b_h, grad_h0); grad_b_h is empty without a bias."""
    grad_proj, grad_w_h, grad_b_h, grad_h0 = _kernels(backend).rnn_bwd(
        output_view(grad_states, backend), grad_h_n, states, h0, proj, ids, w_h, has_bias, allow_tf32, cell)
    return grad_proj, grad_w_h, grad_b_h if has_bias else w_h.new_empty(0), grad_h0


@_recurrence_backward.register_fake
def _(grad_states, grad_h_n, states, h0, proj, ids, w_h, has_bias, backend, allow_tf32, cell):
    B, H = grad_h_n.shape
    return (torch.empty_like(proj), torch.empty_like(w_h), w_h.new_empty(H if has_bias else 0),
            w_h.new_empty((B, H)))


def _recurrence_setup_context(ctx, inputs, output):
    proj, ids, w_h, b_h, h0, backend, allow_tf32, cell = inputs
    ctx.save_for_backward(proj, ids, w_h, output[0], h0)
    ctx.has_bias, ctx.backend, ctx.allow_tf32, ctx.cell = b_h is not None, backend, allow_tf32, cell


def _recurrence_autograd(ctx, grad_states, grad_h_n):
    proj, ids, w_h, states, h0 = ctx.saved_tensors
    if grad_states is None:
        grad_states = torch.zeros_like(states)
    if grad_h_n is None:
        B, H = output_view(states, ctx.backend).shape[0], w_h.shape[0]
        grad_h_n = w_h.new_zeros((B, H))
    grad_proj, grad_w_h, grad_b_h, grad_h0 = _recurrence_backward(
        grad_states, grad_h_n, states, h0, proj, ids, w_h, ctx.has_bias, ctx.backend, ctx.allow_tf32, ctx.cell)
    return (grad_proj, None, grad_w_h, grad_b_h if ctx.has_bias else None,
            grad_h0 if ctx.needs_input_grad[4] else None, None, None, None)


_recurrence.register_autograd(_recurrence_autograd, setup_context=_recurrence_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fused_rnn: the fused backends ('cpu', 'triton') have no double backward (a "
                       "gradient of a gradient: create_graph=True then backward again, hessian, "
                       "gradient penalties); use backend='reference'")


# Registered so that a second backward names the limit instead of PyTorch's generic message.
_recurrence_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _check_tensor(name, t, ndim, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_inputs(x, w_in, b_in, w_h, b_h, h0, embedding, lengths=None):
    """Raises a ValueError/TypeError/IndexError for any malformed input; returns nothing."""
    _check_tensor("w_h", w_h, 2)
    H = w_h.shape[0]
    if H == 0 or w_h.shape[1] != H:
        raise ValueError(f"w_h must be square [H, H] with H >= 1, got {tuple(w_h.shape)}")
    _check_tensor("w_in", w_in, 2)
    E = w_in.shape[1]
    _check_tensor("w_in", w_in, 2, (H, E))
    tokens = embedding is not None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if tokens:
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"token input x must be an integer tensor, got {x.dtype}")
        _check_tensor("x", x, 2)
        _check_tensor("embedding", embedding, 2)
        if embedding.shape[1] != E:
            raise ValueError(f"embedding must be [V, {E}] to match w_in [H, E], got {tuple(embedding.shape)}")
    else:
        if not x.dtype.is_floating_point:
            raise TypeError(f"x is {x.dtype}: integer token ids need embedding=; dense x must be float")
        _check_tensor("x", x, 3)
        if x.shape[2] != E:
            raise ValueError(f"dense x must be [B, T, {E}] to match w_in [H, E], got {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[1]
    if B == 0 or T == 0:
        raise ValueError(f"x must have a non-empty batch and sequence, got shape {tuple(x.shape)}")
    if b_in is not None:
        _check_tensor("b_in", b_in, 1, (H,))
    if b_h is not None:
        _check_tensor("b_h", b_h, 1, (H,))
    if h0 is not None:
        _check_tensor("h0", h0, 2, (B, H))

    floats = {"w_in": w_in, "b_in": b_in, "w_h": w_h, "b_h": b_h, "h0": h0,
              "embedding": embedding, "x": None if tokens else x}
    floats = {k: v for k, v in floats.items() if v is not None}
    for name, t in floats.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in floats.items():
        if t.dtype != w_h.dtype:
            raise TypeError(f"all float inputs must share one dtype: w_h is {w_h.dtype}, {name} is {t.dtype}")
    for name, t in {**floats, "x": x}.items():
        if t.device != w_h.device:
            raise ValueError(f"all inputs must be on one device: w_h is on {w_h.device}, {name} is on {t.device}")
    if tokens:
        V = embedding.shape[0]
        _check_range(x, 0, V - 1, IndexError, f"token ids must lie in [0, {V})")
    if lengths is not None:
        _check_lengths(lengths, B, T)


def _check_lengths(lengths, B, T):
    _check_tensor("lengths", lengths, 1, (B,))
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    _check_range(lengths, 1, T, ValueError, f"lengths must lie in [1, T={T}]")


def _check_range(values, lo_ok, hi_ok, error, message):
    """Raises ``error(message)`` unless every value lies in ``[lo_ok, hi_ok]``."""
    if torch._C._functorch.is_batchedtensor(values):
        raise RuntimeError("fused_rnn: torch.vmap over token ids or lengths is not supported (their "
                           "range check reads their values); fold the vmapped dimension into the batch")
    lo, hi = torch.aminmax(values)
    if values.device.type == "cuda" or torch.compiler.is_compiling():
        # No host sync per call (and none is possible in a compiled graph, which keeps this
        # assert): the check is queued before any kernel, and a bad value stops the program there
        # (a RuntimeError on CPU; a device-side assert on CUDA, where a kernel cannot print it).
        torch._assert_async((lo >= lo_ok) & (hi <= hi_ok), message)
    elif int(lo) < lo_ok or int(hi) > hi_ok:
        raise error(f"{message}, got values in [{int(lo)}, {int(hi)}]")


def _fused_limit(inputs) -> Optional[str]:
    """The differentiation mode active for these inputs that the fused kernels cannot follow (they
    are custom ops with a reverse-mode rule only), or None."""
    if torch.compiler.is_compiling():
        return None
    forward = "forward-mode AD (torch.func.jvp, jacfwd, hessian; torch.autograd.forward_ad)"
    if forward_ad._current_level >= 0 and any(
            forward_ad.unpack_dual(t).tangent is not None for t in inputs if t is not None):
        return forward
    if torch._C._functorch.maybe_current_level() is not None:
        kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        if TransformType.Jvp in kinds:
            return forward
        if TransformType.Grad in kinds:
            return "torch.func's reverse-mode transforms (grad, vjp, jacrev)"
    return None


def _backend_for(backend: str, weight: torch.Tensor, inputs) -> str:
    """The backend that runs: ``backend`` resolved for ``weight``'s device and dtype, or the
    reference loop under a differentiation mode the fused kernels cannot follow (``"auto"``; an
    explicitly asked fused backend raises then)."""
    resolved = _resolve_backend(backend, weight.device, weight.dtype)
    limit = _fused_limit(inputs) if resolved != "reference" else None
    if limit is None:
        return resolved
    if backend != "auto":
        raise RuntimeError(f"fused_rnn: backend={backend!r} does not support {limit}; "
                           f"use backend='reference' (backend='auto' switches to it)")
    return "reference"


def _as_index(ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Integer ids or lengths of a dtype the kernels and F.embedding cannot read (uint8, int8,
    int16, uint16, ...) as int64, once; anything else as it is (the checks judge it)."""
    if (isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point and not ids.dtype.is_complex
            and ids.dtype != torch.bool and ids.dtype not in INDEX_DTYPES):
        return ids.to(torch.int64)
    return ids


def _autocast_inputs(tensors: dict, weight: str = "w_h") -> dict:
    """Under torch.autocast, float inputs in the autocast dtype (the recurrence is GEMM-bound,
    so it runs in the lower precision, as nn.RNN does); ``weight`` names the tensor whose
    device decides."""
    w_h = tensors[weight]
    device_type = w_h.device.type if isinstance(w_h, torch.Tensor) else "cpu"
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype in FLOAT_DTYPES else v)
            for k, v in tensors.items()}


def _occurring_rows(embedding, ids):
    """``embedding`` with the rows of tokens absent from ``ids`` zeroed. The reference loop never
    reads them, so a NaN or Inf there must not reach a gradient, as it would through the table's
    ``dW_in = dU^T E`` (dU is zero there, and 0 * NaN is NaN)."""
    occurs = torch.zeros(embedding.shape[0], dtype=torch.bool, device=embedding.device)
    occurs.index_fill_(0, ids.reshape(-1), True)
    return torch.where(occurs[:, None], embedding, 0)


def _apply_lengths(output, h_n, lengths, T):
    """Zeros past each sequence's end; h_n at each sequence's last valid step. The recurrence is
    causal, so steps past the end never touch earlier ones and, masked out, get no gradient."""
    valid = torch.arange(T, device=output.device)[None, :] < lengths[:, None]  # [B, T]
    output = output * valid[..., None].to(output.dtype)
    h_n = output[torch.arange(output.shape[0], device=output.device), lengths - 1]
    return output, h_n


def fused_rnn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    b_in: Optional[torch.Tensor],
    w_h: torch.Tensor,
    b_h: Optional[torch.Tensor],
    h0: Optional[torch.Tensor] = None,
    *,
    embedding: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
    allow_tf32: bool = False,
):
    """All T steps of ``h_t = tanh(W_h (h_{t-1} + relu(W_in e(x_t) + b_in)) + b_h)``.

    Args:
        x: token ids ``[B, T]`` (any integer dtype) with ``embedding [V, E]``, or dense input
            ``[B, T, E]``.
        w_in: ``[H, E]``; b_in: ``[H]`` or None.
        w_h: ``[H, H]``; b_h: ``[H]`` or None.
        h0: initial state ``[B, H]``, or None for zeros.
        embedding: ``[V, E]``, for token input.
        lengths: ``[B]`` integer sequence lengths in ``[1, T]`` for a padded batch: outputs past
            a sequence's end are zeros, ``h_n`` is its state at its last valid step, and padding
            gets no gradient. None: every sequence is T long.
        backend: ``"triton"`` (CUDA), ``"cpu"`` (the C++ extension; fp32/fp64), ``"reference"``
            (the plain loop) or ``"auto"``: the fastest for the tensors' device and dtype (see
            :func:`fused_rnn.backends`).
        allow_tf32: let fp32 recurrences use TF32 tensor cores (faster, ~1e-3 relative error).
            Off by default: fp32 results match the reference to fp32 rounding.

    Returns:
        ``(output [B, T, H], h_n [B, H])``: every state ``h_1..h_T`` and the last one. The
        output of a fused backend is a view of the kernels' states, not contiguous (the cpu
        backend's is time-major in memory: ``output.transpose(0, 1)`` is contiguous); use
        ``.reshape`` rather than ``.view``. Differentiable with respect to every float input.
        Float inputs share one dtype (fp16, bf16, fp32, fp64); half types accumulate and keep
        the state in fp32. Under ``torch.autocast`` the float inputs are cast to the autocast
        dtype.

    Not supported by the fused backends: forward-mode AD (``torch.func.jvp``/``jacfwd``,
    ``torch.autograd.forward_ad``) and ``torch.func``'s reverse-mode transforms (``grad``,
    ``vjp``, ``jacrev``), where ``backend="auto"`` runs the reference loop and an explicit fused
    backend raises; double backward (raises at the second backward). ``torch.vmap`` over ``x``'s
    token ids or ``lengths`` raises on every backend.
    """
    t = _autocast_inputs(dict(x=x, w_in=w_in, b_in=b_in, w_h=w_h, b_h=b_h, h0=h0, embedding=embedding))
    x, w_in, b_in, w_h, b_h, h0, embedding = (t[k] for k in ("x", "w_in", "b_in", "w_h", "b_h", "h0", "embedding"))
    x, lengths = _as_index(x) if embedding is not None else x, _as_index(lengths)
    _check_inputs(x, w_in, b_in, w_h, b_h, h0, embedding, lengths)
    backend = _backend_for(backend, w_h, (x, w_in, b_in, w_h, b_h, h0, embedding))
    if backend == "reference":
        output, h_n = rnn_reference(x, w_in, b_in, w_h, b_h, h0, embedding=embedding)
    else:
        # The input projection is a parallel GEMM; autograd differentiates it.
        if embedding is not None:
            ids = x.to(torch.int64).contiguous()
            proj = F.linear(_occurring_rows(embedding, ids), w_in, b_in)  # U [V, H]
        else:
            proj, ids = F.linear(x, w_in, b_in), None  # P [B, T, H]
        states, h_n = _recurrence(
            proj.contiguous(), ids, w_h.contiguous(), b_h.contiguous() if b_h is not None else None,
            h0.contiguous() if h0 is not None else None, backend, allow_tf32, "course")
        output = output_view(states, backend).to(w_h.dtype)
    if lengths is not None:
        output, h_n = _apply_lengths(output, h_n, lengths.to(device=output.device, dtype=torch.int64),
                                     x.shape[1])
    return output, h_n


def _check_elman_inputs(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity, lengths):
    """Raises a ValueError/TypeError for any malformed input to :func:`elman_rnn`."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    _check_tensor("w_hh", w_hh, 2)
    H = w_hh.shape[0]
    if H == 0 or w_hh.shape[1] != H:
        raise ValueError(f"w_hh must be square [H, H] with H >= 1, got {tuple(w_hh.shape)}")
    _check_tensor("w_ih", w_ih, 2)
    if w_ih.shape[0] != H:
        raise ValueError(f"w_ih must be [H={H}, I], got {tuple(w_ih.shape)}")
    I = w_ih.shape[1]
    _check_tensor("x", x, 3)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a float tensor [B, T, I], got {x.dtype}")
    if x.shape[2] != I:
        raise ValueError(f"x must be [B, T, {I}] to match w_ih [H, I], got {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[1]
    if B == 0 or T == 0:
        raise ValueError(f"x must have a non-empty batch and sequence, got shape {tuple(x.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(name, b, 1, (H,))
    if h0 is not None:
        _check_tensor("h0", h0, 2, (B, H))
    floats = {k: v for k, v in dict(x=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, h0=h0).items()
              if v is not None}
    for name, t in floats.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != w_hh.dtype:
            raise TypeError(f"all float inputs must share one dtype: w_hh is {w_hh.dtype}, {name} is {t.dtype}")
        if t.device != w_hh.device:
            raise ValueError(f"all inputs must be on one device: w_hh is on {w_hh.device}, {name} is on {t.device}")
    if lengths is not None:
        _check_lengths(lengths, B, T)


def elman_rnn(
    x: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: Optional[torch.Tensor] = None,
    b_hh: Optional[torch.Tensor] = None,
    h0: Optional[torch.Tensor] = None,
    *,
    nonlinearity: str = "tanh",
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
    allow_tf32: bool = False,
):
    """All T steps of ``torch.nn.RNN``'s own (Elman) cell, one layer, one direction, batch first:
    ``h_t = act(x_t @ W_ih^T + b_ih + h_{t-1} @ W_hh^T + b_hh)``, ``act`` = tanh or relu.

    Args:
        x: ``[B, T, I]``.
        w_ih: ``[H, I]``; w_hh: ``[H, H]``; b_ih, b_hh: ``[H]`` or None.
        h0: ``[B, H]`` or None (zeros).
        nonlinearity: ``"tanh"`` or ``"relu"``.
        lengths, backend, allow_tf32: as in :func:`fused_rnn.fused_rnn`.

    Returns:
        ``(output [B, T, H], h_n [B, H])``, differentiable with respect to every float input.
    """
    t = _autocast_inputs(dict(x=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, h0=h0), "w_hh")
    x, w_ih, w_hh, b_ih, b_hh, h0 = (t[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0"))
    lengths = _as_index(lengths)
    _check_elman_inputs(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity, lengths)
    backend = _backend_for(backend, w_hh, (x, w_ih, w_hh, b_ih, b_hh, h0))
    if backend == "reference":
        output, h_n = elman_reference(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity=nonlinearity)
    else:
        # q_t = x_t W_ih^T + b_ih + b_hh for all steps: one GEMM over B*T rows before the
        # recurrence (autograd differentiates it), in the layout the backend reads.
        cell = f"elman_{nonlinearity}"
        bias = b_ih + b_hh if b_ih is not None and b_hh is not None else b_ih if b_ih is not None else b_hh
        q = F.linear(x.transpose(0, 1) if elman_q_time_major(backend, cell) else x, w_ih, bias)
        states, h_n = _recurrence(q.contiguous(), None, w_hh.contiguous(), None,
                                  h0.contiguous() if h0 is not None else None, backend, allow_tf32, cell)
        output = output_view(states, backend).to(w_hh.dtype)
    if lengths is not None:
        output, h_n = _apply_lengths(output, h_n, lengths.to(device=output.device, dtype=torch.int64),
                                     x.shape[1])
    return output, h_n
