"""The recurrence in Triton: one launch runs all T steps forward, one runs the BPTT chain backward.

Entry points (shared with the CPU extension; `fused_rnn.function` wraps them in autograd):
``rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32) -> ws`` and
``rnn_bwd(grad_out, grad_h_n, ws, proj, ids, w_h, has_bias, allow_tf32)
-> (grad_proj, grad_w_h, grad_b_h, grad_h0)``.

The input projection ``p = W_in e(x) + b_in`` is not here: it is a parallel GEMM that the caller
computes with PyTorch (for token input, once per vocabulary row: the table ``U [V, H]``), and
autograd differentiates it. This file owns only the sequential part:

    forward   a_t = h_{t-1} + relu(p_t);  h_t = tanh(a_t @ W_h^T + b_h)
    backward  g_t = dL/dh_t (output grad + carry);  dz_t = g_t * (1 - h_t^2);  c_t = dz_t @ W_h
              c_t is both the carry into step t-1 and dL/dr_t.

Each program owns a block of batch rows and all of H, so programs never wait on each other.
A program writes h_t (or c_t) for one column block at a time and reads it back in full in the
next step, with a barrier between the steps so all its threads see each other's writes.
The weight/bias gradients and dL/dp are large parallel GEMMs/reductions done after the loop
(with PyTorch, in `rnn_bwd`).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import workspace_dtype

# The interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs kernels on CPU
# tensors; this module is imported lazily so the variable can be set up to first use.
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


@triton.jit(do_not_specialize=["B", "T"])
def rnn_fwd_kernel(
    proj_ptr,  # [R, H]: rows of p (R = V for token input, B*T for dense input)
    ids_ptr,  # [B, T] int64 token ids (token input only)
    w_h_ptr,  # [H, H]
    b_h_ptr,  # [H]
    h_ptr,  # [B, T+1, H] state workspace (fp32, fp64 for fp64): h[:, 0] = h0, h[:, t+1] = h_t
    B,
    T,
    H,
    TOKENS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TANH_SMALL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    h_row = rows64 * (T + 1) * H  # int64: B*T*H passes 2^31 at realistic sizes
    for t in range(T):
        if TOKENS:
            src = tl.load(ids_ptr + rows64 * T + t, mask=row_ok, other=0)
        else:
            src = rows64 * T + t
        p_row = src * H
        h_prev = h_ptr + h_row + t * H
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=h_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                mask = row_ok[:, None] & k_ok[None, :]
                h = tl.load(h_prev[:, None] + ks[None, :], mask=mask, other=0.0)
                p = tl.load(proj_ptr + p_row[:, None] + ks[None, :], mask=mask, other=0.0)
                a = h + tl.maximum(p.to(h.dtype), 0.0)
                # w[k, n] = W_h[n, k]
                w = tl.load(w_h_ptr + cols[None, :] * H + ks[:, None],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
            if HAS_BIAS:
                acc += tl.load(b_h_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
            tl.store(h_prev[:, None] + H + cols[None, :], _tanh(acc, TANH_SMALL),
                     mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()  # h_t must be visible to every thread of this program before step t+1


@triton.jit(do_not_specialize=["B", "T"])
def rnn_bwd_kernel(
    grad_out_ptr,  # [B, T, H] dL/dh_t from the output (workspace dtype)
    h_ptr,  # [B, T+1, H] the forward's state workspace
    w_h_ptr,  # [H, H]
    c_ptr,  # [B, T+1, H] workspace: c[:, T] = dL/dh_n on entry; c[:, t] = dz_t @ W_h on exit
    B,
    T,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    ws_row = rows64 * (T + 1) * H
    go_row = rows64 * T * H
    for s in range(T):
        t = T - 1 - s
        c_next = c_ptr + ws_row + (t + 1) * H
        h_t = h_ptr + ws_row + (t + 1) * H
        g_out = grad_out_ptr + go_row + t * H
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=c_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                mask = row_ok[:, None] & k_ok[None, :]
                offs = ks[None, :]
                g = tl.load(g_out[:, None] + offs, mask=mask, other=0.0) \
                    + tl.load(c_next[:, None] + offs, mask=mask, other=0.0)
                h = tl.load(h_t[:, None] + offs, mask=mask, other=0.0)
                dz = g * (1.0 - h * h)
                # w[k, n] = W_h[k, n]
                w = tl.load(w_h_ptr + ks[:, None] * H + cols[None, :],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
            tl.store(c_next[:, None] - H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()  # c_t must be visible to every thread of this program before step t-1


# ----------------------------------------------------------------------------------------------
# Launchers


def _block_sizes(B: int, H: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K). tl.dot needs K >= 16."""
    h_block = max(16, triton.next_power_of_2(H))
    if INTERPRET:
        # The interpreter's cost is per operation, not per element: the fewest, largest blocks.
        return min(64, triton.next_power_of_2(B)), min(h_block, 128), min(h_block, 128)
    return 16, min(h_block, 64), min(h_block, 64)


def _on_device(t: torch.Tensor):
    """Kernels launch on the current CUDA device: make it the tensors' (e.g. cuda:1)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def _check_runnable(t: torch.Tensor) -> None:
    if t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu"):
        if INTERPRET and t.dtype in (torch.float16, torch.bfloat16):
            raise RuntimeError(
                "the Triton interpreter computes bf16/fp16 dots wrongly; use fp32 or fp64 under "
                "TRITON_INTERPRET=1, or run on a CUDA device")
        return
    raise RuntimeError(
        f"the triton backend runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before fused_rnn is imported); got a {t.device.type} tensor. Use backend='auto'.")


def rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32=False):
    """Runs the forward recurrence. Returns the state workspace ``[B, T+1, H]`` (fp32/fp64):
    ``ws[:, 0] = h0`` and ``ws[:, t+1] = h_t``.

    proj: ``[V, H]`` (with ``ids [B, T]``) or ``[B, T, H]`` (``ids=None``), contiguous.
    """
    _check_runnable(w_h)
    B, T = (ids.shape if ids is not None else proj.shape[:2])
    H = w_h.shape[0]
    ws = torch.empty(B, T + 1, H, device=w_h.device, dtype=workspace_dtype(w_h.dtype))
    if h0 is None:
        ws[:, 0].zero_()
    else:
        ws[:, 0].copy_(h0)
    BLOCK_B, BLOCK_N, BLOCK_K = _block_sizes(B, H)
    grid = (triton.cdiv(B, BLOCK_B),)
    with _on_device(ws):
        rnn_fwd_kernel[grid](
            proj, ids if ids is not None else proj, w_h, b_h if b_h is not None else w_h, ws,
            B, T, H,
            TOKENS=ids is not None, HAS_BIAS=b_h is not None,
            BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            TANH_SMALL=1e-3 if ws.dtype == torch.float64 else 0.0625,
            DOT_PRECISION=_dot_precision(w_h.dtype, allow_tf32),
        )
    return ws


def rnn_bwd(grad_out, grad_h_n, ws, proj, ids, w_h, has_bias, allow_tf32=False):
    """Backward through all steps: ``(grad_proj, grad_w_h, grad_b_h, grad_h0)`` (``grad_b_h``
    None without a bias), in the dtypes of ``proj`` and ``w_h``."""
    c = _bwd_chain(grad_out, grad_h_n, ws, w_h, allow_tf32)
    # Everything else is parallel over (B, T): large GEMMs and reductions, in the workspace
    # dtype, cast to the inputs' dtype at the end.
    H = w_h.shape[0]
    p = (proj[ids] if ids is not None else proj).to(ws.dtype)
    h = ws[:, 1:]
    dz = ((grad_out.to(ws.dtype) + c[:, 1:]) * (1.0 - h * h)).reshape(-1, H)
    a = (ws[:, :-1] + torch.relu(p)).reshape(-1, H)
    grad_w_h = (dz.t() @ a).to(w_h.dtype)
    grad_b_h = dz.sum(0).to(w_h.dtype) if has_bias else None
    dp = c[:, :-1] * (p > 0)
    if ids is not None:
        grad_proj = torch.zeros(proj.shape, device=proj.device, dtype=ws.dtype)
        grad_proj.index_add_(0, ids.reshape(-1), dp.reshape(-1, H))
    else:
        grad_proj = dp
    grad_h0 = c[:, 0].to(w_h.dtype)
    return grad_proj.to(proj.dtype), grad_w_h, grad_b_h, grad_h0


def _bwd_chain(grad_out, grad_h_n, ws, w_h, allow_tf32):
    """Runs the reverse-time chain. Returns ``c [B, T+1, H]`` with ``c[:, t] = dz_t @ W_h`` for
    ``t < T`` (the gradient reaching ``h_{t-1}`` and ``r_t`` from step ``t``) and
    ``c[:, T] = grad_h_n``."""
    B, T1, H = ws.shape
    T = T1 - 1
    c = torch.empty_like(ws)
    c[:, T].copy_(grad_h_n)
    grad_out = grad_out.to(ws.dtype).contiguous()
    BLOCK_B, BLOCK_N, BLOCK_K = _block_sizes(B, H)
    grid = (triton.cdiv(B, BLOCK_B),)
    with _on_device(ws):
        rnn_bwd_kernel[grid](
            grad_out, ws, w_h, c, B, T, H,
            BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            DOT_PRECISION=_dot_precision(w_h.dtype, allow_tf32),
        )
    return c
