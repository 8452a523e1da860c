"""Persistent split-H kernels for the gated cells (LSTM, GRU): one launch runs all T steps, W_hh on chip.

The LSTM's and GRU's twins of `triton_persistent.py`'s kernels, with the same machinery: program
``(g, j)`` owns batch group ``g`` (``BLOCK_B`` rows) and block ``j`` of ``BLOCK_N`` hidden units,
and waits at the group's barrier (`triton_persistent._group_barrier`: one counter per (group,
step), release arrive, bounded acquire spin) once per step, in each direction.

    forward   The program keeps the W_hh rows of all G gates of its units on chip for all T steps
              (G tiles ``[H_PAD, BLOCK_N]``, ``w_gate[k, n] = W_hh[gate*H + unit_n, k]``) and its
              units' previous state in registers (the LSTM's c, the GRU's h). Per step: read the
              group's full-width h_{t-1} (written by the sibling programs), G products, the cell's
              pointwise update (`triton_cells._gated_step`), store h_t, c_t and `saved` of its
              units, barrier.
    backward  (no projection: P == H, so a program's units are also its columns of h.) The
              program keeps ``W_hh[:, its columns]`` on chip (G tiles ``[H_PAD, BLOCK_N]``,
              ``w_gate[k, n] = W_hh[gate*H + k, col_n]``). Reverse step t, phase A for its units:
              gh = grad_out[t] + the carry into h_t of its columns (which it computed itself in
              phase B of step t+1: registers), the pointwise backward (`_gated_step_backward`),
              store grad_q[t] = dz of its units, keep the share carried outside the product (the
              LSTM's dc * f into c_{t-1}, the GRU's gh * z into h_{t-1}); barrier (every
              sibling's dz_t written); phase B for its columns: the carry into h_{t-1} =
              da_t[all G*H] @ W_hh[:, cols] (+ the GRU's share), da = dz but for the GRU's n rows,
              da_n = dz_n * r. So loop iteration s runs phase B of step T-s, then phase A of step
              T-1-s, then the barrier: T+1 iterations, T barriers.

The weight gradients are PyTorch GEMMs after the loop, shared with the blocked kernels
(`triton_gated._bwd`). Never hang, never silently wrong, as for the one-gate kernels: cooperative
launch, every wait bounded, a timed-out wait sets the error flag and from then on the program
writes NaN into everything it owns; the launcher (`triton_rnn._run_persistent`) reads the flag
and reruns on the blocked kernels. Stepwise mode (``STEPWISE=True``, the interpreter): one launch
per loop iteration, the launch boundary the barrier; what a program keeps in registers across
iterations (c or h of its units, the share) is reloaded from memory at the start of a launch.
The tiling comes from `planner.plan_persistent(..., gates=G)`, and every product's K runs in its
``Plan.k_split`` chunks, summed (`triton_persistent._chunked_dot`); the projection (proj_size) has
no persistent kernel (the blocked kernels run it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .planner import Plan
from .. import cells
from .triton_cells import _gated_step, _gated_step_backward
from .triton_common import _rows_before
from .triton_persistent import (_chunked_dot, _group_barrier, _k_chunks, _launch, _per_col, _per_row,
                                _program_tile)


@triton.jit
def _load_gates(ptrs, gate_stride, mask, G: tl.constexpr, dtype: tl.constexpr, CACHE: tl.constexpr):
    # The same tile of each of G gates, gate_stride apart (x3 repeats x2 when G == 3: unused).
    x0 = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=CACHE).to(dtype)
    x1 = tl.load(ptrs + gate_stride, mask=mask, other=0.0, cache_modifier=CACHE).to(dtype)
    x2 = tl.load(ptrs + 2 * gate_stride, mask=mask, other=0.0, cache_modifier=CACHE).to(dtype)
    x3 = x2
    if G == 4:
        x3 = tl.load(ptrs + 3 * gate_stride, mask=mask, other=0.0, cache_modifier=CACHE).to(dtype)
    return x0, x1, x2, x3


@triton.jit(do_not_specialize=["B", "T", "step_begin", "step_end", "spin_limit"])
def gated_persistent_fwd_kernel(
    q_ptr,  # [T, B, G*H] x W_ih^T plus the biases that fold into it (input dtype)
    w_hh_ptr,  # [G*H, H]
    b_hh_ptr,  # [G*H] (HAS_BIAS: the GRU's, added to the product)
    h0_ptr,  # [B, H] workspace dtype (zeros when the caller gave none)
    c0_ptr,  # [B, H] workspace dtype (HAS_C)
    out_ptr,  # [T, B, H] h_1..h_T (workspace dtype, as all that follows)
    cs_ptr,  # [T, B, H] c_1..c_T (HAS_C)
    saved_ptr,  # [T, B, 4H] what the backward reads: i, f, g, o or r, z, n, a_n
    arrivals_ptr,  # [groups, T] int32 zeros: the barrier counters
    error_ptr,  # [1] int32: set to 1 when a barrier wait times out
    B,
    T,
    H,
    step_begin,  # steps [step_begin, step_end) run in this launch (all of them unless stepwise)
    step_end,
    spin_limit,
    G: tl.constexpr,  # cells.Cell.gates: 4 or 3
    HAS_C: tl.constexpr,  # a cell state c (the LSTM)
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    H_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STEPWISE: tl.constexpr,
    CELL: tl.constexpr,  # cells.Cell.name: the pointwise maths
    K_SPLIT: tl.constexpr,  # each product's K in this many chunks (Plan.k_split)
):
    group, n_col_blocks, rows64, row_ok, units, unit_ok, _, _, _, own = _program_tile(
        B, H, BLOCK_B, BLOCK_N, H_PAD)
    k_row, k_col, in_mask = _k_chunks(row_ok, H, H_PAD, K_SPLIT)
    ws_ty = out_ptr.dtype.element_ty
    GH = G * H
    # The W_hh rows of every gate of this program's units, on chip for all steps, in the
    # workspace dtype (half weights upcast once, as in the one-gate kernels).
    # w_gate[c, k, n] = W_hh[gate*H + unit_n, c*KC + k]
    w0, w1, w2, w3 = _load_gates(w_hh_ptr + _per_col(units, K_SPLIT).to(tl.int64) * H + k_col, H * H,
                                 (k_col < H) & _per_col(unit_ok, K_SPLIT), G, ws_ty, "")
    if HAS_BIAS:
        b0, b1, b2, b3 = _load_gates(b_hh_ptr + units, H, unit_ok, G, ws_ty, "")
    # The previous state of this program's units (the LSTM's c, the GRU's h), kept in registers.
    if HAS_C:
        prev_rows = _rows_before(c0_ptr, cs_ptr, step_begin, B, rows64, H)
    else:
        prev_rows = _rows_before(h0_ptr, out_ptr, step_begin, B, rows64, H)
    prev = tl.load(prev_rows[:, None] + units[None, :], mask=own, other=0.0)
    ok = tl.full([], 1, tl.int32)
    for t in range(step_begin, step_end):
        t64 = tl.cast(t, tl.int64)
        h_rows = _rows_before(h0_ptr, out_ptr, t64, B, rows64, H)
        # .cg: the siblings' columns were written by other SMs; read them from L2, not L1.
        h = tl.load(_per_row(h_rows, K_SPLIT) + k_row, mask=in_mask, other=0.0, cache_modifier=".cg")
        # After a failed wait: NaN in all this program writes. The products sit in the branch so
        # that they read the W_hh tiles from shared memory each step; outside it the compiler
        # holds all G tiles in registers (LSTM, H=256, 4 warps, sm_90: 34 KB spilled).
        a0 = tl.full([BLOCK_B, BLOCK_N], float("nan"), ws_ty)
        a1 = a0
        a2 = a0
        a3 = a0  # G == 3: unused
        if ok != 0:
            a0 = _chunked_dot(h, w0, DOT_PRECISION, K_SPLIT)
            a1 = _chunked_dot(h, w1, DOT_PRECISION, K_SPLIT)
            a2 = _chunked_dot(h, w2, DOT_PRECISION, K_SPLIT)
            if G == 4:
                a3 = _chunked_dot(h, w3, DOT_PRECISION, K_SPLIT)
        if HAS_BIAS:
            a0 += b0[None, :]
            a1 += b1[None, :]
            a2 += b2[None, :]
            a3 += b3[None, :]
        step = t64 * B + rows64  # this step's rows of every [T, B, .] tensor
        x0, x1, x2, x3 = _load_gates(q_ptr + step[:, None] * GH + units[None, :], H, own, G, ws_ty, "")
        new, c, s0, s1, s2, s3 = _gated_step(a0, a1, a2, a3, x0, x1, x2, x3, prev, CELL)
        s = saved_ptr + step[:, None] * 4 * H + units[None, :]
        tl.store(s, s0, mask=own)
        tl.store(s + H, s1, mask=own)
        tl.store(s + 2 * H, s2, mask=own)
        tl.store(s + 3 * H, s3, mask=own)
        if HAS_C:
            tl.store(cs_ptr + step[:, None] * H + units[None, :], c, mask=own)
        tl.store(out_ptr + step[:, None] * H + units[None, :], new, mask=own)
        prev = c  # the GRU's c is its h_t
        if not STEPWISE:  # every h_t column of the group written before any sibling reads it
            still_ok = _group_barrier(arrivals_ptr + group * T + t, n_col_blocks, spin_limit, ok)
            tl.store(error_ptr, 1, mask=(ok != 0) & (still_ok == 0))
            ok = still_ok


@triton.jit(do_not_specialize=["B", "T", "step_begin", "step_end", "spin_limit"])
def gated_persistent_bwd_kernel(
    grad_out_ptr,  # [T, B, H] dL/dh_t from the output (workspace dtype, as all but the weights)
    grad_cs_ptr,  # [T, B, H] dL/dc_t from the output (HAS_GRAD_CS)
    out_ptr,  # [T, B, H] the forward's h_1..h_T
    cs_ptr,  # [T, B, H] the forward's c_1..c_T (HAS_C)
    saved_ptr,  # [T, B, 4H] the forward's gates
    h0_ptr,  # [B, H] (zeros when the caller gave none)
    c0_ptr,  # [B, H] (HAS_C)
    w_hh_ptr,  # [G*H, H]
    grad_q_ptr,  # [T, B, G*H] out: dL/dq_t
    carry_h_ptr,  # [T+1, B, H]: on exit slot t = dL/dh_{t-1} (slot 0: dL/dh0); slot T not read
    share_ptr,  # [2, B, H] zero on entry: the share carried outside the product, ping-pong by step
    arrivals_ptr,  # [groups, T] int32 zeros
    error_ptr,  # [1] int32
    B,
    T,
    H,
    step_begin,  # loop iterations s in [step_begin, step_end) of [0, T] run in this launch
    step_end,
    spin_limit,
    G: tl.constexpr,
    HAS_C: tl.constexpr,
    HAS_GRAD_CS: tl.constexpr,
    N_ROWS_SCALED: tl.constexpr,  # the GRU: dL/da_n = dL/dq_n * r (n = tanh(q_n + r a_n))
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    H_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STEPWISE: tl.constexpr,
    CELL: tl.constexpr,
    K_SPLIT: tl.constexpr,  # each product's K in this many chunks (Plan.k_split)
):
    group, n_col_blocks, rows64, row_ok, cols, col_ok, _, _, _, own = _program_tile(
        B, H, BLOCK_B, BLOCK_N, H_PAD)
    k_row, k_col, in_mask = _k_chunks(row_ok, H, H_PAD, K_SPLIT)
    ws_ty = out_ptr.dtype.element_ty
    GH = G * H
    # W_hh[:, this program's columns], one [H_PAD, BLOCK_N] tile per gate (as K chunks), on chip
    # for all steps.
    w0, w1, w2, w3 = _load_gates(w_hh_ptr + k_col.to(tl.int64) * H + _per_col(cols, K_SPLIT), H * H,
                                 (k_col < H) & _per_col(col_ok, K_SPLIT), G, ws_ty, "")
    # Carried in registers from one iteration to the next; from memory at the start of a launch
    # (the share: the slot the previous iteration wrote; the carry: phase B computes it first).
    share = tl.load(share_ptr + ((step_begin % 2) * B + rows64)[:, None] * H + cols[None, :], mask=own, other=0.0)
    carry = tl.zeros([BLOCK_B, BLOCK_N], dtype=ws_ty)  # into h_{T-1}: none (grad_out holds dL/dh_n)
    ok = tl.full([], 1, tl.int32)
    for s in range(step_begin, step_end):
        if s > 0:  # phase B of step T-s: the carry into h_{T-s-1}, this program's columns
            step = tl.cast(T - s, tl.int64) * B + rows64
            # One gate at a time, each product right after its load, so that one operand buffer
            # serves all G (loaded together: G buffers, 128 KB of shared memory for the LSTM at
            # H=256, fp32, sm_90). .cg: the siblings' dz were written by other SMs.
            dz = grad_q_ptr + _per_row(step, K_SPLIT) * GH + k_row
            acc = _chunked_dot(tl.load(dz, mask=in_mask, other=0.0, cache_modifier=".cg"), w0, DOT_PRECISION,
                               K_SPLIT)
            acc += _chunked_dot(tl.load(dz + H, mask=in_mask, other=0.0, cache_modifier=".cg"), w1, DOT_PRECISION,
                                K_SPLIT)
            d2 = tl.load(dz + 2 * H, mask=in_mask, other=0.0, cache_modifier=".cg")
            if N_ROWS_SCALED:  # r sits at saved[:, :H]
                d2 *= tl.load(saved_ptr + _per_row(step, K_SPLIT) * 4 * H + k_row, mask=in_mask, other=1.0)
            acc += _chunked_dot(d2, w2, DOT_PRECISION, K_SPLIT)
            if G == 4:
                acc += _chunked_dot(tl.load(dz + 3 * H, mask=in_mask, other=0.0, cache_modifier=".cg"), w3,
                                    DOT_PRECISION, K_SPLIT)
            if not HAS_C:  # the GRU's gh * z reaches h_{t-1} directly: this program's units
                acc += share
            carry = tl.where(ok != 0, acc, float("nan"))  # after a failed wait: NaN from here on
            tl.store(carry_h_ptr + step[:, None] * H + cols[None, :], carry, mask=own)
        if s < T:  # phase A of step t = T-1-s, this program's units
            t = tl.cast(T - 1 - s, tl.int64)
            step = t * B + rows64
            offs = step[:, None] * H + cols[None, :]
            gh = tl.load(grad_out_ptr + offs, mask=own, other=0.0) + carry
            s0, s1, s2, s3 = _load_gates(saved_ptr + step[:, None] * 4 * H + cols[None, :], H, own, 4, ws_ty, "")
            gc = gh  # the GRU: unused
            c = gh
            if HAS_C:
                prev_rows = _rows_before(c0_ptr, cs_ptr, t, B, rows64, H)
                gc = share
                if HAS_GRAD_CS:
                    gc += tl.load(grad_cs_ptr + offs, mask=own, other=0.0)
                c = tl.load(cs_ptr + offs, mask=own, other=0.0)
            else:
                prev_rows = _rows_before(h0_ptr, out_ptr, t, B, rows64, H)
            prev = tl.load(prev_rows[:, None] + cols[None, :], mask=own, other=0.0)
            d0, d1, d2, d3, share = _gated_step_backward(gh, gc, s0, s1, s2, s3, prev, c, CELL)
            dq = grad_q_ptr + step[:, None] * GH + cols[None, :]
            tl.store(dq, d0, mask=own)
            tl.store(dq + H, d1, mask=own)
            tl.store(dq + 2 * H, d2, mask=own)
            if G == 4:
                tl.store(dq + 3 * H, d3, mask=own)
            tl.store(share_ptr + (((s + 1) % 2) * B + rows64)[:, None] * H + cols[None, :], share, mask=own)
            if not STEPWISE:  # every sibling's dz_t written before this program's phase B reads them
                still_ok = _group_barrier(arrivals_ptr + group * T + s, n_col_blocks, spin_limit, ok)
                tl.store(error_ptr, 1, mask=(ok != 0) & (still_ok == 0))
                ok = still_ok


# ----------------------------------------------------------------------------------------------
# Launchers. Each runs the kernel over all steps into workspaces the caller allocated and
# returns nothing; a timed-out barrier shows in ``error`` (and as NaN in the workspaces).


def _constexprs(plan: Plan, cell: cells.Cell) -> dict:
    return dict(G=cell.gates, HAS_C="c" in cell.state, BLOCK_B=plan.block_b, BLOCK_N=plan.block_n,
                H_PAD=plan.h_pad, K_SPLIT=plan.k_split, DOT_PRECISION=plan.precision, CELL=cell.name)


def _arrivals(plan: Plan, T: int, device) -> torch.Tensor:
    return torch.zeros(plan.groups * max(T, 1), device=device, dtype=torch.int32)


def gated_persistent_fwd(q, w_hh, b_hh, h_first, c_first, out, cs, saved, plan: Plan, error, *,
                         stepwise: bool, spin_limit: int | None = None, cell=cells.LSTM) -> None:
    """Fills ``out``, ``cs`` (the LSTM) and ``saved`` (``[T, B, .]``, as `triton_gated._fwd`
    allocates them) from ``q``, ``h_first`` and ``c_first`` (``[B, H]``, workspace dtype)."""
    cell = cells.get(cell)
    T, B, H = out.shape
    args = (q, w_hh, b_hh if b_hh is not None else w_hh, h_first, c_first, out,
            cs if cs.numel() else out, saved, _arrivals(plan, T, out.device), error, B, T, H)
    _launch(gated_persistent_fwd_kernel, plan, args, T, stepwise, spin_limit,
            dict(_constexprs(plan, cell), HAS_BIAS=b_hh is not None))


def gated_persistent_bwd(grad_out, grad_cs, out, cs, saved, h_first, c_first, w_hh, grad_q, carry_h, share,
                         plan: Plan, error, *, stepwise: bool, spin_limit: int | None = None,
                         cell=cells.LSTM) -> None:
    """Fills ``grad_q [T, B, G*H]``, ``carry_h[:T]`` and ``share`` (``share`` zero on entry) as
    `triton_gated.gated_bwd_kernel` does, from the forward's ``out``, ``cs``, ``saved``."""
    cell = cells.get(cell)
    T, B, H = out.shape
    args = (grad_out, grad_cs if grad_cs is not None else grad_out, out, cs if cs.numel() else out, saved,
            h_first, c_first, w_hh, grad_q, carry_h, share, _arrivals(plan, T, out.device), error, B, T, H)
    # T+1 loop iterations: phase A of the first step has no phase B before it, the last phase B
    # no phase A after it.
    _launch(gated_persistent_bwd_kernel, plan, args, T + 1, stepwise, spin_limit,
            dict(_constexprs(plan, cell), HAS_GRAD_CS=grad_cs is not None,
                 N_ROWS_SCALED=cell is cells.GRU))
