"""The recurrence in Triton: one launch runs all T steps forward, one runs the BPTT chain backward.

Entry points (shared with the CPU extension; `fused_rnn.recurrence_op` wraps them in autograd):
``rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32, cell) -> ws`` and
``rnn_bwd(grad_out, grad_h_n, ws, h0, proj, ids, w_h, has_bias, allow_tf32, cell)
-> (grad_proj, grad_w_h, grad_b_h, grad_h0)``.

The input projection ``p = W_in e(x) + b_in`` is not here: it is a parallel GEMM that the caller
computes with PyTorch (for token input, once per vocabulary row: the table ``U [V, H]``), and
autograd differentiates it. This file owns only the sequential part:

    forward   a_t = h_{t-1} + relu(p_t);  h_t = tanh(a_t @ W_h^T + b_h)
    backward  g_t = dL/dh_t (output grad + carry);  dz_t = g_t * (1 - h_t^2);  c_t = dz_t @ W_h
              c_t is both the carry into step t-1 and dL/dr_t.

The ``CELL`` constexpr (a `cells.Cell`'s name; each cell's pointwise maths in `triton_cells.py`)
switches the same kernels to nn.RNN's own cell:

    forward   h_t = act(h_{t-1} @ W_h^T + q_t), act = tanh ("elman_tanh") or relu ("elman_relu"),
              q = proj [B, T, H] with both biases in it (no ids, no b_h)
    backward  dz_t = g_t * act'(h_t) (1 - h^2, or h > 0);  c_t = dz_t @ W_h is the carry only;
              dL/dq = dz, dL/dW_h = sum_t dz_t^T h_{t-1}

Two kernel families run the sequential part; ``FUSED_RNN_TRITON_KERNEL`` (read on every call:
``auto``, ``blocked``, ``persistent``) picks one:

* blocked (here): each program owns a block of batch rows and all of H, so
  programs never wait on each other. A program writes h_t (or c_t) for one column block at a
  time and reads it back in full in the next step, with a barrier between the steps so all its
  threads see each other's writes. W_h is re-read from L2 every step.
* persistent (`triton_persistent.py`): programs split H as well and keep their W_h slice on
  chip, synchronising per batch group each step; `planner.py` says whether a problem fits.
  ``auto`` runs its forward where it fits on a GPU and T >= AUTO_PERSISTENT_MIN_T, the blocked
  kernels elsewhere and for the backward (`AUTO_PERSISTENT_MIN_T`).

The variable, the plan, the timeout flag and the fallback to the blocked kernels below
(`_persistent_plan`, `_run_persistent`) serve the LSTM's and GRU's persistent kernels too
(`triton_gated_persistent.py`, launched from `triton_gated.py`).

The weight/bias gradients and dL/dp are large parallel GEMMs/reductions done after the loop
(with PyTorch, in `rnn_bwd`; the token-table gradient has a deterministic kernel below for
``torch.use_deterministic_algorithms(True)``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import torch
import triton
import triton.language as tl

from . import planner, self_check, workspace_dtype
from .. import cells
from ..reference import activation_grad
from . import loop
from .triton_cells import _activation, _activation_grad, _input_before_product
from .triton_common import INTERPRET


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
    DOT_PRECISION: tl.constexpr,
    CELL: tl.constexpr,  # cells.Cell.name
    INPUT_BEFORE_PRODUCT: tl.constexpr,  # cells.Cell.input_before_product
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
        h_prev = h_ptr + h_row + tl.cast(t, tl.int64) * H  # T*H alone can pass 2^31
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=h_ptr.dtype.element_ty)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                mask = row_ok[:, None] & k_ok[None, :]
                a = tl.load(h_prev[:, None] + ks[None, :], mask=mask, other=0.0)
                if INPUT_BEFORE_PRODUCT:
                    p = tl.load(proj_ptr + p_row[:, None] + ks[None, :], mask=mask, other=0.0)
                    a = _input_before_product(a, p.to(a.dtype))
                # w[k, n] = W_h[n, k]
                w = tl.load(w_h_ptr + cols[None, :] * H + ks[:, None],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
            out_mask = row_ok[:, None] & col_ok[None, :]
            if not INPUT_BEFORE_PRODUCT:
                acc += tl.load(proj_ptr + p_row[:, None] + cols[None, :], mask=out_mask, other=0.0).to(acc.dtype)
            if HAS_BIAS:
                acc += tl.load(b_h_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
            tl.store(h_prev[:, None] + H + cols[None, :], _activation(acc, CELL), mask=out_mask)
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
    CELL: tl.constexpr,  # cells.Cell.name: which activation's gradient
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    ws_row = rows64 * (T + 1) * H
    go_row = rows64 * T * H
    for s in range(T):
        t = tl.cast(T - 1 - s, tl.int64)
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
                dz = _activation_grad(g, h, CELL)
                # w[k, n] = W_h[k, n]
                w = tl.load(w_h_ptr + ks[:, None] * H + cols[None, :],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
            tl.store(c_next[:, None] - H + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
        tl.debug_barrier()  # c_t must be visible to every thread of this program before step t-1


@triton.jit
def token_table_grad_kernel(
    dp_ptr,  # [B*T, H] dL/dp per position (workspace dtype)
    order_ptr,  # [B*T] int64 positions sorted by token id (stable)
    seg_start_ptr,  # [V+1] int64: positions of token v are order[seg_start[v]:seg_start[v+1]]
    grad_ptr,  # [V, H] dL/dU
    H,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per (token, column block) sums its positions in a fixed order: the same bits
    # every run, unlike index_add_'s float atomics on CUDA.
    v = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    start = tl.load(seg_start_ptr + v)
    end = tl.load(seg_start_ptr + v + 1)
    acc = tl.zeros([BLOCK_N], dtype=grad_ptr.dtype.element_ty)
    for i0 in range(start, end, BLOCK_R):
        i = i0 + tl.arange(0, BLOCK_R)
        i_ok = i < end
        pos = tl.load(order_ptr + i, mask=i_ok, other=0)
        rows = tl.load(dp_ptr + pos[:, None] * H + cols[None, :], mask=i_ok[:, None] & col_ok[None, :],
                       other=0.0)
        acc += tl.sum(rows, axis=0)
    tl.store(grad_ptr + v.to(tl.int64) * H + cols, acc, mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Launchers


def blocked_block_sizes(B: int, H: int, interpret: bool = INTERPRET) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K) of the blocked kernels. tl.dot needs K >= 16."""
    h_block = max(16, triton.next_power_of_2(H))
    if interpret:
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


# Which kernel family runs, read on every call so that a benchmark can switch it between calls.
KERNEL_ENV = "FUSED_RNN_TRITON_KERNEL"
KERNEL_CHOICES = ("auto", "blocked", "persistent")
# Set to 1 to read the persistent kernels' timeout flag right after each launch (a host sync):
# a timed-out call then reruns on the blocked kernels instead of returning NaN.
SYNC_CHECK_ENV = "FUSED_RNN_SYNC_CHECK"
# The interpreter runs programs one after another, so a cross-program barrier cannot complete
# there: it runs the persistent kernels one step per launch (tests may switch this off to see
# a barrier time out).
PERSISTENT_STEPWISE = INTERPRET


class PersistentKernelWarning(RuntimeWarning):
    """The persistent kernels failed (launch error or barrier timeout); the blocked kernels run."""


# ``auto``'s shortest sequence for the persistent forward. Measured on an H200 (RESULTS.md, the
# GPU runs): at T=512 it is 2-14x faster than the blocked forward at every shape timed; at B=512,
# T=8 the blocked one was 1.2x faster (0.49 against 0.62 ms): the persistent launch costs ~0.4 ms
# more and saves ~40 us a step (H=256), even from about T=11. ``auto``'s backward stays on the
# blocked kernels: the persistent backward passes the CUDA tests, but no GPU run has timed it yet
# (every fwd+bwd time so far ran the blocked backward: RESULTS.md, the third GPU run).
AUTO_PERSISTENT_MIN_T = 16


def selected_kernel() -> str:
    """``FUSED_RNN_TRITON_KERNEL``: ``"auto"``, ``"blocked"`` or ``"persistent"``."""
    value = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if value not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {KERNEL_CHOICES}, got {value!r}")
    return value


class _PersistentState:
    """Per process: whether the persistent path has failed, what was warned, and per device the
    sticky timeout flag the kernels set, with a pinned host copy read without a sync."""

    def __init__(self):
        self.disabled_reason = None
        self.warned = set()
        self.flags = {}  # device -> (error [1] int32 on the device, pinned host copy, event)

    def warn_once(self, key, message, category):
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(f"fused_rnn: {message}", category, stacklevel=4)

    def fail(self, reason):
        self.disabled_reason = reason
        self.warn_once("failed", f"persistent Triton kernels disabled for this process: {reason}; "
                       f"the blocked kernels run instead", PersistentKernelWarning)


_persistent = _PersistentState()


def reset_persistent_state() -> None:
    """Forget an earlier persistent-kernel failure (for tests)."""
    global _persistent
    _persistent = _PersistentState()


_gpus = {}


def _gpu(device: torch.device):
    """(SM count, compute capability as 90 for sm_90) of a CUDA device; (None, 90) otherwise."""
    if device.type != "cuda":
        return None, 90
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpus:
        props = torch.cuda.get_device_properties(index)
        _gpus[index] = (props.multi_processor_count, props.major * 10 + props.minor)
    return _gpus[index]


def _persistent_plan(B, T, H, w_h, allow_tf32, gates=1, projection=False, backward=False):
    """The persistent plan to run (for a cell of ``gates`` gates, with or without the LSTM's
    projection; the forward or the ``backward``), or None for the blocked kernels: ``persistent``
    wherever the planner fits it (else a warning), ``auto`` for the forward where it fits on a GPU
    and T >= AUTO_PERSISTENT_MIN_T (the interpreter's stepwise persistent kernels are a test mode,
    so ``auto`` there is blocked)."""
    kernel = selected_kernel()
    if kernel == "blocked" or (kernel == "auto" and (backward or PERSISTENT_STEPWISE
                                                     or T < AUTO_PERSISTENT_MIN_T)):
        return None
    if _persistent.disabled_reason is None:
        _check_earlier_launches(w_h.device)
    if _persistent.disabled_reason is not None:
        return None
    sm_count, arch = _gpu(w_h.device)
    plan = planner.plan_persistent(B, H, w_h.dtype, sm_count, allow_tf32=allow_tf32,
                                   stepwise=PERSISTENT_STEPWISE, arch=arch, gates=gates,
                                   projection=projection)
    if not plan.fits:
        if kernel == "persistent":
            _persistent.warn_once("does not fit", f"{KERNEL_ENV}=persistent: {plan.reason}; the blocked "
                                  f"kernels run (warned once)", UserWarning)
        return None
    return plan


def _choose_path(B, T, H, w_h, allow_tf32, tokens, has_bias, cell, backward=False):
    """(family, persistent plan or None) that answers this call: the persistent kernels if
    selected and they fit, else the blocked ones; each path only once it has passed its first-use
    self-check (`self_check.py`), else the next one down, at the bottom the plain loop."""
    forced = self_check.forced()  # a running self-check: its small problem, the tiling it checks
    if forced is not None:
        family, plan = forced
        return family, plan and dataclasses.replace(plan, groups=-(-B // plan.block_b))
    plan = _persistent_plan(B, T, H, w_h, allow_tf32, backward=backward)
    precision = "tf32" if _dot_precision(w_h.dtype, allow_tf32) == "tf32" else str(w_h.dtype)[6:]
    shape = (precision, f"H_PAD={max(16, triton.next_power_of_2(H))}",
             "H%16=0" if H % 16 == 0 else "H%16>0", "tokens" if tokens else "dense",
             "bias" if has_bias else "no-bias")
    candidates = [("persistent", plan)] if plan is not None else []
    candidates.append(("blocked", None))
    for family, p in candidates:
        tiles = (f"tiles={p.block_b}x{p.block_n}", f"warps={p.num_warps}") if p is not None else \
            ("tiles={}x{}x{}".format(*blocked_block_sizes(B, H)),)
        path = (family, f"{cell.name}-cell") + shape + tiles
        if self_check.passes(path, w_h.device, lambda: self_check.check(
                (family, p), precision, rnn_fwd, rnn_bwd, B=B, H=H, dtype=w_h.dtype, device=w_h.device,
                tokens=tokens, has_bias=has_bias, allow_tf32=allow_tf32, cell=cell,
                broken=lambda: _persistent.disabled_reason if family == "persistent" else None)):
            return family, p
    return "loop", None


def persistent_disabled_reason():
    """Why the persistent kernels are off for this process (a launch failed, a barrier timed
    out), or None."""
    return _persistent.disabled_reason


def _error_flag(device):
    if device not in _persistent.flags:
        error = torch.zeros(1, device=device, dtype=torch.int32)
        host = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        _persistent.flags[device] = (error, host, None)
    return _persistent.flags[device][0]


def _check_earlier_launches(device):
    """Reads the pinned copy of the flag if the copy has landed (event done): no sync."""
    if device not in _persistent.flags:
        return
    error, host, event = _persistent.flags[device]
    if event is not None and event.query() and int(host[0]) != 0:
        _persistent.fail("a barrier wait timed out in an earlier call (its outputs were NaN)")


def _run_persistent(launch, ws) -> bool:
    """Runs ``launch(error_flag)``; False (and the persistent path disabled, with a warning)
    if it failed in a way seen now, so the caller reruns on the blocked kernels."""
    device = ws.device
    error = _error_flag(device)
    if device.type != "cuda":  # the interpreter: launch errors are bugs, the flag costs nothing
        launch(error)
        if int(error[0]) != 0:
            _persistent.fail("a barrier wait timed out")
            return False
        return True
    try:
        launch(error)
    except Exception as exc:  # e.g. a cooperative grid too large to be resident, out of resources
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _persistent.fail(f"launch failed ({type(exc).__name__}: {first_line})")
        return False
    if os.environ.get(SYNC_CHECK_ENV, "0") == "1":
        if int(error[0]) != 0:
            _persistent.fail("a barrier wait timed out")
            return False
    elif not torch.cuda.is_current_stream_capturing():
        _, host, _ = _persistent.flags[device]
        host.copy_(error, non_blocking=True)  # read at the next call, once it has landed
        event = torch.cuda.Event()
        event.record()
        _persistent.flags[device] = (error, host, event)
    return True


def rnn_fwd(proj, ids, w_h, b_h, h0, allow_tf32=False, cell=cells.COURSE.name):
    """Runs the forward recurrence. Returns the state workspace ``[B, T+1, H]`` (fp32/fp64):
    ``ws[:, 0] = h0`` and ``ws[:, t+1] = h_t``.

    proj: ``[V, H]`` (with ``ids [B, T]``) or ``[B, T, H]`` (``ids=None``), contiguous; for the
    elman cells q ``[B, T, H]`` with ``ids`` and ``b_h`` None.
    """
    _check_runnable(w_h)
    cell = cells.get(cell)
    B, T = (ids.shape if ids is not None else proj.shape[:2])
    H = w_h.shape[0]
    ws = torch.empty(B, T + 1, H, device=w_h.device, dtype=workspace_dtype(w_h.dtype))
    if h0 is None:
        ws[:, 0].zero_()
    else:
        ws[:, 0].copy_(h0)
    family, plan = _choose_path(B, T, H, w_h, allow_tf32, ids is not None, b_h is not None, cell)
    with _on_device(ws):
        if family == "loop":
            loop.loop_fwd(proj, ids, w_h, b_h, ws, cell)
            return ws
        if plan is not None and _run_persistent(lambda error: _persistent_ops().persistent_fwd(
                proj, ids, w_h, b_h, ws, plan, error, stepwise=PERSISTENT_STEPWISE, cell=cell), ws):
            return ws
        BLOCK_B, BLOCK_N, BLOCK_K = blocked_block_sizes(B, H)
        rnn_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            proj, ids if ids is not None else proj, w_h, b_h if b_h is not None else w_h, ws,
            B, T, H,
            TOKENS=ids is not None, HAS_BIAS=b_h is not None,
            BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            DOT_PRECISION=_dot_precision(w_h.dtype, allow_tf32), CELL=cell.name,
            INPUT_BEFORE_PRODUCT=cell.input_before_product,
        )
    return ws


def rnn_bwd(grad_out, grad_h_n, ws, h0, proj, ids, w_h, has_bias, allow_tf32=False, cell=cells.COURSE.name):
    """Backward through all steps: ``(grad_proj, grad_w_h, grad_b_h, grad_h0)`` (``grad_b_h``
    None without a bias), in the dtypes of ``proj`` and ``w_h``. ``h0`` is not read (``ws[:, 0]``
    holds it)."""
    cell = cells.get(cell)
    c = _bwd_chain(grad_out, grad_h_n, ws, w_h, allow_tf32, cell, ids is not None, has_bias)
    # Everything else is parallel over (B, T): large GEMMs and reductions, in the workspace
    # dtype, cast to the inputs' dtype at the end.
    H = w_h.shape[0]
    h = ws[:, 1:]
    g = grad_out.to(ws.dtype) + c[:, 1:]
    grad_h0 = c[:, 0].to(w_h.dtype).contiguous()  # not a view of c: the fake op is contiguous
    if not cell.input_before_product:  # dL/dq = dz; the product's partner is h_{t-1}
        dz = activation_grad(cell, g, h)
        grad_w_h = (dz.reshape(-1, H).t() @ ws[:, :-1].reshape(-1, H)).to(w_h.dtype)
        return dz.to(proj.dtype), grad_w_h, None, grad_h0
    p = (proj[ids] if ids is not None else proj).to(ws.dtype)
    dz = activation_grad(cell, g, h).reshape(-1, H)
    a = (ws[:, :-1] + torch.relu(p)).reshape(-1, H)
    grad_w_h = (dz.t() @ a).to(w_h.dtype)
    grad_b_h = dz.sum(0).to(w_h.dtype) if has_bias else None
    dp = torch.where(p <= 0, 0.0, c[:, :-1])  # as torch.relu's backward: 0 where p <= 0, even for NaN c
    if ids is not None:
        grad_proj = token_table_grad(ids, dp, proj.shape[0],
                                     deterministic=torch.are_deterministic_algorithms_enabled())
    else:
        grad_proj = dp
    return grad_proj.to(proj.dtype), grad_w_h, grad_b_h, grad_h0


def token_grad_block_n(H: int) -> int:
    return min(128, max(16, triton.next_power_of_2(H)))


def token_table_grad(ids, dp, V, deterministic=False):
    """``dU [V, H]``: the sum of ``dp [B, T, H]`` over the positions of each token id.
    ``deterministic``: sort the positions by id and sum each token's rows in order in a kernel
    (bitwise reproducible); otherwise ``index_add_`` (float atomics on CUDA)."""
    H = dp.shape[-1]
    dp = dp.reshape(-1, H).contiguous()
    ids = ids.reshape(-1)
    grad = torch.zeros(V, H, device=dp.device, dtype=dp.dtype)
    if not deterministic:
        return grad.index_add_(0, ids, dp)
    sorted_ids, order = torch.sort(ids, stable=True)
    seg_start = torch.searchsorted(sorted_ids, torch.arange(V + 1, device=ids.device))
    BLOCK_N = token_grad_block_n(H)
    with _on_device(dp):
        token_table_grad_kernel[(V, triton.cdiv(H, BLOCK_N))](
            dp, order, seg_start, grad, H, BLOCK_R=16, BLOCK_N=BLOCK_N)
    return grad


def _bwd_chain(grad_out, grad_h_n, ws, w_h, allow_tf32, cell, tokens, has_bias):
    """Runs the reverse-time chain. Returns ``c [B, T+1, H]`` with ``c[:, t] = dz_t @ W_h`` for
    ``t < T`` (the gradient reaching ``h_{t-1}`` and ``r_t`` from step ``t``) and
    ``c[:, T] = grad_h_n`` (zeros if None)."""
    B, T1, H = ws.shape
    T = T1 - 1
    c = torch.empty_like(ws)
    if grad_h_n is None:
        c[:, T].zero_()
    else:
        c[:, T].copy_(grad_h_n)
    grad_out = grad_out.to(ws.dtype).contiguous()
    family, plan = _choose_path(B, T, H, w_h, allow_tf32, tokens, has_bias, cell, backward=True)
    with _on_device(ws):
        if family == "loop":
            loop.loop_bwd(grad_out, ws, w_h, c, cell)
            return c
        if plan is not None and _run_persistent(lambda error: _persistent_ops().persistent_bwd(
                grad_out, ws, w_h, c, plan, error, stepwise=PERSISTENT_STEPWISE, cell=cell), ws):
            return c
        BLOCK_B, BLOCK_N, BLOCK_K = blocked_block_sizes(B, H)
        rnn_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
            grad_out, ws, w_h, c, B, T, H,
            BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            DOT_PRECISION=_dot_precision(w_h.dtype, allow_tf32), CELL=cell.name,
        )
    return c


def _persistent_ops():
    # Imported on first use: compiling its kernels' definitions costs import time.
    from . import triton_persistent
    return triton_persistent
