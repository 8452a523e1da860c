"""The public functions ``fused_rnn`` (the course's cell), ``elman_rnn`` (torch.nn.RNN's),
``lstm`` and ``gru`` (torch.nn.LSTM's and GRU's): checks, autocast, the input projection as one
PyTorch GEMM, then the fused recurrence op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import cells
from .checks import FLOAT_DTYPES, as_index, check_elman_inputs, check_gated_inputs, check_inputs
from .dispatch import backend_for
from .ops import elman_q_time_major, output_view, projection
from .gated_op import gated_recurrence
from .recurrence_op import recurrence
from .reference import elman_reference, gated_loop, rnn_reference


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


def _apply_lengths(output, lengths, T):
    """Zeros past each sequence's end; h_n at each sequence's last valid step. The recurrence is
    causal, so steps past the end never touch earlier ones and, masked out, get no gradient."""
    valid = torch.arange(T, device=output.device)[None, :] < lengths[:, None]  # [B, T]
    output = output * valid[..., None].to(output.dtype)
    return output, _at_last_step(output, lengths)


def _at_last_step(seq, lengths):
    """``seq [B, T, F]`` at each sequence's last valid step, ``[B, F]``."""
    return seq[torch.arange(seq.shape[0], device=seq.device), lengths - 1]


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
    backend raises. Double backward works (with ``create_graph=True`` the backward is the
    reference loop's, recorded). ``torch.vmap`` over ``x``'s
    token ids or ``lengths`` raises on every backend.
    """
    t = _autocast_inputs(dict(x=x, w_in=w_in, b_in=b_in, w_h=w_h, b_h=b_h, h0=h0, embedding=embedding))
    x, w_in, b_in, w_h, b_h, h0, embedding = (t[k] for k in ("x", "w_in", "b_in", "w_h", "b_h", "h0", "embedding"))
    x, lengths = as_index(x) if embedding is not None else x, as_index(lengths)
    check_inputs(x, w_in, b_in, w_h, b_h, h0, embedding, lengths)
    backend = backend_for(backend, w_h, (x, w_in, b_in, w_h, b_h, h0, embedding))
    if backend == "reference":
        output, h_n = rnn_reference(x, w_in, b_in, w_h, b_h, h0, embedding=embedding)
    else:
        ids = x.to(torch.int64).contiguous() if embedding is not None else None
        inside = ()
        if embedding is not None and backend == "cpu":
            # the [V, H] table U = E W_in^T + b_in is formed inside the extension, which
            # differentiates it too
            proj, inside = embedding.contiguous(), (w_in.contiguous(), b_in.contiguous() if b_in is not None else None)
        elif embedding is not None:  # U [V, H]: autograd differentiates it
            proj = F.linear(_occurring_rows(embedding, ids), w_in, b_in)
        else:
            proj = F.linear(x, w_in, b_in)  # P [B, T, H], one parallel GEMM
        states, h_n = recurrence(
            proj.contiguous(), ids, w_h.contiguous(), b_h.contiguous() if b_h is not None else None,
            h0.contiguous() if h0 is not None else None, backend, allow_tf32, cells.COURSE.name, *inside)
        output = output_view(states, backend).to(w_h.dtype)
    if lengths is not None:
        output, h_n = _apply_lengths(output, lengths.to(device=output.device, dtype=torch.int64),
                                     x.shape[1])
    return output, h_n


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
    lengths = as_index(lengths)
    check_elman_inputs(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity, lengths)
    backend = backend_for(backend, w_hh, (x, w_ih, w_hh, b_ih, b_hh, h0))
    if backend == "reference":
        output, h_n = elman_reference(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity=nonlinearity)
    else:
        # q_t = x_t W_ih^T + b_ih + b_hh: on the cpu backend formed inside the recurrence, step by
        # step; elsewhere one GEMM over B*T rows before it (autograd differentiates it), in the
        # layout the backend reads.
        cell = cells.elman(nonlinearity).name
        bias = _bias_sum(b_ih, b_hh)
        h0 = h0.contiguous() if h0 is not None else None
        if backend == "cpu":
            states, h_n = recurrence(x, None, w_hh.contiguous(), bias, h0, backend, allow_tf32, cell,
                                      w_ih.contiguous())
        else:
            q = projection.linear(x.transpose(0, 1) if elman_q_time_major(backend, cell) else x, w_ih, bias)
            states, h_n = recurrence(q.contiguous(), None, w_hh.contiguous(), None, h0, backend, allow_tf32, cell)
        output = output_view(states, backend).to(w_hh.dtype)
    if lengths is not None:
        output, h_n = _apply_lengths(output, lengths.to(device=output.device, dtype=torch.int64),
                                     x.shape[1])
    return output, h_n


def _bias_sum(a, b):
    return a + b if a is not None and b is not None else a if a is not None else b


def _gated(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, backend, allow_tf32):
    """``(output [B, T, P], h_n [B, P], c_n [B, H] or None)`` of the LSTM or GRU on ``x [B, T, I]``."""
    names = ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0", "w_hr")
    t = _autocast_inputs(dict(zip(names, (x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr))), "w_hh")
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr = (t[k] for k in names)
    lengths = as_index(lengths)
    check_gated_inputs(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths)
    given = (x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr)
    backend = backend_for(backend, w_hh, given)
    # q = x W_ih^T with the biases that fold into it, time-major. The GRU's b_hh stays with the
    # product (its n rows sit inside the reset gate). On the cpu backend q is formed inside the
    # time loop, step by step; elsewhere by one GEMM over all B*T rows before it.
    hidden_bias = b_hh if cell.hidden_bias else None
    folded_bias = b_ih if cell.hidden_bias else _bias_sum(b_ih, b_hh)
    if backend == "reference":
        out, cs, _ = gated_loop(cell, F.linear(x.transpose(0, 1), w_ih, folded_bias), w_hh, hidden_bias, h0, c0, w_hr)
        return _gated_results(out, cs, x, lengths, out[-1], None if cs is None else cs[-1])

    def contiguous(t):
        return None if t is None else t.contiguous()

    if backend == "cpu":
        q, w_ih_inside, b_ih_inside = x, contiguous(w_ih), contiguous(folded_bias)
    else:
        q, w_ih_inside, b_ih_inside = contiguous(projection.linear(x.transpose(0, 1), w_ih, folded_bias)), None, None
    differentiable = (q, w_hh, hidden_bias, h0, c0, w_hr, w_ih_inside, b_ih_inside)
    keep_saved = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
    out, cs, _, h_n, c_n = gated_recurrence(q, w_hh.contiguous(), contiguous(hidden_bias), contiguous(h0),
                                            contiguous(c0), contiguous(w_hr), backend, allow_tf32, cell.name,
                                            keep_saved, w_ih_inside, b_ih_inside)
    out, h_n = out.to(w_hh.dtype), h_n.to(w_hh.dtype)
    cs, c_n = (cs.to(w_hh.dtype), c_n.to(w_hh.dtype)) if cs.numel() else (None, None)
    return _gated_results(out, cs, x, lengths, h_n, c_n)


def _gated_results(out, cs, x, lengths, h_n, c_n):
    """``(output [B, T, P], h_n, c_n or None)`` from the time-major states (and the LSTM's c);
    ``h_n``, ``c_n``: the last step's, which sequences without lengths return."""
    output = out.transpose(0, 1)  # [B, T, P], a view of the time-major states
    if lengths is None:
        return output, h_n, c_n
    lengths = lengths.to(device=output.device, dtype=torch.int64)
    output, h_n = _apply_lengths(output, lengths, x.shape[1])
    return output, h_n, None if cs is None else _at_last_step(cs.transpose(0, 1), lengths)


def lstm(
    x: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: Optional[torch.Tensor] = None,
    b_hh: Optional[torch.Tensor] = None,
    h0: Optional[torch.Tensor] = None,
    c0: Optional[torch.Tensor] = None,
    w_hr: Optional[torch.Tensor] = None,
    *,
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
    allow_tf32: bool = False,
):
    """All T steps of ``torch.nn.LSTM``'s cell, one layer, one direction, batch first: gate rows
    i, f, g, o; ``z = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``, ``c_t = f c_{t-1} + i g``,
    ``h_t = o tanh(c_t)`` (then ``h_t W_hr^T`` with ``w_hr``, torch's ``proj_size``).

    Args:
        x: ``[B, T, I]``.
        w_ih: ``[4H, I]``; w_hh: ``[4H, P]`` (``P = H`` without ``w_hr``); b_ih, b_hh: ``[4H]`` or None.
        h0: ``[B, P]``, c0: ``[B, H]``, or None (zeros).
        w_hr: ``[P, H]`` or None.
        lengths, backend, allow_tf32: as in :func:`fused_rnn.fused_rnn`.

    Returns:
        ``(output [B, T, P], (h_n [B, P], c_n [B, H]))``, differentiable with respect to every
        float input; with ``lengths``, the states at each sequence's last valid step.
    """
    output, h_n, c_n = _gated(cells.LSTM, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths, backend, allow_tf32)
    return output, (h_n, c_n)


def gru(
    x: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: Optional[torch.Tensor] = None,
    b_hh: Optional[torch.Tensor] = None,
    h0: Optional[torch.Tensor] = None,
    *,
    lengths: Optional[torch.Tensor] = None,
    backend: str = "auto",
    allow_tf32: bool = False,
):
    """All T steps of ``torch.nn.GRU``'s cell, one layer, one direction, batch first: gate rows
    r, z, n; ``r = sigmoid(x_t W_ir^T + b_ir + h W_hr^T + b_hr)``, z alike,
    ``n = tanh(x_t W_in^T + b_in + r (h W_hn^T + b_hn))``, ``h_t = (1 - z) n + z h_{t-1}``.

    Args:
        x: ``[B, T, I]``; w_ih: ``[3H, I]``; w_hh: ``[3H, H]``; b_ih, b_hh: ``[3H]`` or None;
        h0: ``[B, H]`` or None (zeros); lengths, backend, allow_tf32: as in :func:`fused_rnn.fused_rnn`.

    Returns:
        ``(output [B, T, H], h_n [B, H])``, differentiable with respect to every float input.
    """
    output, h_n, _ = _gated(cells.GRU, x, w_ih, w_hh, b_ih, b_hh, h0, None, None, lengths, backend, allow_tf32)
    return output, h_n
