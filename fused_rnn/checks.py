"""Input checks of the public functions: shapes, dtypes, devices and value ranges, each a
ValueError / TypeError / IndexError saying expected vs got, before any kernel runs."""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)  # what F.embedding and the kernels read; others are cast
NONLINEARITIES = ("tanh", "relu")


def _check_tensor(name, t, ndim, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_inputs(x, w_in, b_in, w_h, b_h, h0, embedding, lengths=None):
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


def as_index(ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Integer ids or lengths of a dtype the kernels and F.embedding cannot read (uint8, int8,
    int16, uint16, ...) as int64, once; anything else as it is (the checks judge it)."""
    if (isinstance(ids, torch.Tensor) and not ids.dtype.is_floating_point and not ids.dtype.is_complex
            and ids.dtype != torch.bool and ids.dtype not in INDEX_DTYPES):
        return ids.to(torch.int64)
    return ids


def check_elman_inputs(x, w_ih, w_hh, b_ih, b_hh, h0, nonlinearity, lengths):
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
    _check_floats(floats, "w_hh", w_hh)
    if lengths is not None:
        _check_lengths(lengths, B, T)


def check_gated_inputs(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr, lengths):
    """Raises a ValueError/TypeError for any malformed input to :func:`fused_rnn.lstm` or
    :func:`fused_rnn.gru` (``cell`` their `cells.Cell`; ``c0`` and ``w_hr`` the LSTM's)."""
    G, name = cell.gates, cell.name.upper()
    _check_tensor("w_hh", w_hh, 2)
    if w_hh.shape[0] == 0 or w_hh.shape[0] % G:
        raise ValueError(f"w_hh must be [{G}*H, P] with H >= 1 for the {name}, got {tuple(w_hh.shape)}")
    H, P = w_hh.shape[0] // G, w_hh.shape[1]
    if w_hr is not None:
        _check_tensor("w_hr", w_hr, 2, (P, H))
    elif P != H:
        raise ValueError(f"w_hh must be [{G}*H, H] = [{G * H}, {H}] without w_hr, got {tuple(w_hh.shape)}")
    _check_tensor("w_ih", w_ih, 2)
    if w_ih.shape[0] != G * H:
        raise ValueError(f"w_ih must be [{G}*H={G * H}, I], got {tuple(w_ih.shape)}")
    I = w_ih.shape[1]
    _check_tensor("x", x, 3)
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a float tensor [B, T, I], got {x.dtype}")
    if x.shape[2] != I:
        raise ValueError(f"x must be [B, T, {I}] to match w_ih [G*H, I], got {tuple(x.shape)}")
    B, T = x.shape[0], x.shape[1]
    if B == 0 or T == 0:
        raise ValueError(f"x must have a non-empty batch and sequence, got shape {tuple(x.shape)}")
    for bias_name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(bias_name, b, 1, (G * H,))
    if h0 is not None:
        _check_tensor("h0", h0, 2, (B, P))
    if c0 is not None:
        _check_tensor("c0", c0, 2, (B, H))
    floats = {k: v for k, v in dict(x=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, h0=h0, c0=c0,
                                    w_hr=w_hr).items() if v is not None}
    _check_floats(floats, "w_hh", w_hh)
    if lengths is not None:
        _check_lengths(lengths, B, T)


def _check_floats(floats: dict, ref_name: str, ref: torch.Tensor) -> None:
    """Every tensor of ``floats`` of a float dtype, ``ref``'s dtype and on ``ref``'s device."""
    for name, t in floats.items():
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != ref.dtype:
            raise TypeError(f"all float inputs must share one dtype: {ref_name} is {ref.dtype}, {name} is {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"all inputs must be on one device: {ref_name} is on {ref.device}, "
                             f"{name} is on {t.device}")
