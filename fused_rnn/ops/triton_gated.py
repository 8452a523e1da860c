"""The LSTM's and GRU's recurrence in Triton: one launch runs all T steps forward, one the BPTT chain backward.

Entry points (the gated kernel interface of `ops/__init__.py`, shared with the CPU extension;
`fused_rnn.gated_op` wraps them in autograd), every tensor time-major:
``gated_fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, cell) -> (out, cs, saved)`` and
``gated_bwd(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, cell)
-> (grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0, grad_w_hr)``.

Blocked like `triton_rnn.py`'s kernels: each program owns a block of batch rows and all of H, so
programs never wait on each other; a ``tl.debug_barrier()`` between steps (and between the phases
of a step) makes what one phase wrote to global memory visible to all the program's threads.
W_hh is re-read from L2 every step. One kernel body serves both cells: ``G`` (gates) and the
``CELL`` constexpr (its pointwise maths, `triton_cells._gated_step` and its backward) switch it.

    forward   per block of BLOCK_N hidden units: h_{t-1} W_hh^T for all G gate rows of those units
              (G accumulators), so the pointwise update has i, f, g, o (r, z, n) of the same units
              at hand; it writes h_t (the LSTM with w_hr: m_t, to a scratch), c_t and `saved`.
              With w_hr (proj_size P < H), after a barrier: h_t = m_t W_hr^T.
    backward  phase A, per block of units: gh = grad_out[t] + the carry into h_t (with w_hr:
              times W_hr, the gradient at m_t), the pointwise backward -> grad_q[t] = dz, and the
              share carried to the previous state outside the product (the LSTM's dc * f into
              c_{t-1}; the GRU's gh * z into h_{t-1}); barrier; phase B, per block of P columns:
              the carry into h_{t-1} = da_t @ W_hh (+ the GRU's share), da = dz but for the GRU's
              n rows, da_n = dz_n * r.

With ``FUSED_RNN_TRITON_KERNEL=persistent`` the launchers run the persistent split-H kernels of
`triton_gated_persistent.py` instead where `planner.plan_persistent` plans them (no projection),
through `triton_rnn`'s plan, timeout flag and fallback: a failed persistent run is rerun here.
The weight gradients (``sum_t da_t^T h_{t-1}``, ``sum_t da_t``, ``sum_t gh_t^T m_t``) are large
GEMMs/reductions over all T*B rows after the loop, in PyTorch, whichever family ran the chain. On
CUDA each kernel path answers only after its first-use self-check (`self_check.py`) passed; else
the next one down (persistent -> blocked -> the reference loop) answers.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import cells
from . import loop, self_check, triton_rnn, workspace_dtype
from .triton_cells import _gated_step, _gated_step_backward
from .triton_common import INTERPRET, _rows_before
from .triton_rnn import _check_runnable, _dot_precision, _gpu, _on_device, _persistent_plan, _run_persistent


@triton.jit(do_not_specialize=["B", "T"])
def gated_fwd_kernel(
    q_ptr,  # [T, B, G*H] x W_ih^T plus the biases that fold into it (input dtype)
    w_hh_ptr,  # [G*H, P]
    b_hh_ptr,  # [G*H] (HAS_BIAS: the GRU's, added to the product)
    h0_ptr,  # [B, P] workspace dtype (zeros when the caller gave none)
    c0_ptr,  # [B, H] workspace dtype (HAS_C)
    w_hr_ptr,  # [P, H] (PROJ)
    out_ptr,  # [T, B, P] h_1..h_T (workspace dtype, as all that follows)
    cs_ptr,  # [T, B, H] c_1..c_T (HAS_C)
    saved_ptr,  # [T, B, 4H] what the backward reads: i, f, g, o or r, z, n, a_n
    m_ptr,  # [B, H] scratch: m_t = o tanh(c_t) before the projection (PROJ)
    B,
    T,
    H,
    P,
    G: tl.constexpr,  # cells.Cell.gates: 4 or 3
    HAS_C: tl.constexpr,  # a cell state c (the LSTM)
    HAS_BIAS: tl.constexpr,
    PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CELL: tl.constexpr,  # cells.Cell.name: the pointwise maths
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)  # int64 offsets: T*B*G*H passes 2^31 at realistic sizes
    GH = G * H
    acc_ty = out_ptr.dtype.element_ty
    for t in range(T):
        t64 = tl.cast(t, tl.int64)
        h_prev = _rows_before(h0_ptr, out_ptr, t64, B, rows64, P)
        step = t64 * B + rows64  # this step's rows of every [T, B, .] tensor
        q_t = q_ptr + step * GH
        s_t = saved_ptr + step * 4 * H
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            a0 = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_ty)
            a1 = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_ty)
            a2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_ty)
            a3 = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_ty)
            for k0 in range(0, P, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < P
                h = tl.load(h_prev[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                h = h.to(w_hh_ptr.dtype.element_ty)  # half types: half operands, fp32 accumulate
                # w[k, n] = W_hh[gate * H + n, k]: one tile per gate, all of this block's units
                w = w_hh_ptr + cols[None, :] * P + ks[:, None]
                w_mask = k_ok[:, None] & col_ok[None, :]
                a0 = tl.dot(h, tl.load(w, mask=w_mask, other=0.0), a0,
                            input_precision=DOT_PRECISION, out_dtype=acc_ty)
                a1 = tl.dot(h, tl.load(w + H * P, mask=w_mask, other=0.0), a1,
                            input_precision=DOT_PRECISION, out_dtype=acc_ty)
                a2 = tl.dot(h, tl.load(w + 2 * H * P, mask=w_mask, other=0.0), a2,
                            input_precision=DOT_PRECISION, out_dtype=acc_ty)
                if G == 4:
                    a3 = tl.dot(h, tl.load(w + 3 * H * P, mask=w_mask, other=0.0), a3,
                                input_precision=DOT_PRECISION, out_dtype=acc_ty)
            if HAS_BIAS:
                a0 += tl.load(b_hh_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
                a1 += tl.load(b_hh_ptr + H + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
                a2 += tl.load(b_hh_ptr + 2 * H + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
                if G == 4:
                    a3 += tl.load(b_hh_ptr + 3 * H + cols, mask=col_ok, other=0.0).to(acc_ty)[None, :]
            x = q_t[:, None] + cols[None, :]
            x0 = tl.load(x, mask=mask, other=0.0).to(acc_ty)
            x1 = tl.load(x + H, mask=mask, other=0.0).to(acc_ty)
            x2 = tl.load(x + 2 * H, mask=mask, other=0.0).to(acc_ty)
            x3 = a3  # G == 3: unused
            if G == 4:
                x3 = tl.load(x + 3 * H, mask=mask, other=0.0).to(acc_ty)
            if HAS_C:
                c_prev = _rows_before(c0_ptr, cs_ptr, t64, B, rows64, H)
                prev = tl.load(c_prev[:, None] + cols[None, :], mask=mask, other=0.0)
            else:  # the GRU's h_{t-1} of these units (P == H)
                prev = tl.load(h_prev[:, None] + cols[None, :], mask=mask, other=0.0)
            new, c, s0, s1, s2, s3 = _gated_step(a0, a1, a2, a3, x0, x1, x2, x3, prev, CELL)
            s = s_t[:, None] + cols[None, :]
            tl.store(s, s0, mask=mask)
            tl.store(s + H, s1, mask=mask)
            tl.store(s + 2 * H, s2, mask=mask)
            tl.store(s + 3 * H, s3, mask=mask)
            if HAS_C:
                tl.store(cs_ptr + step[:, None] * H + cols[None, :], c, mask=mask)
            if PROJ:
                tl.store(m_ptr + rows64[:, None] * H + cols[None, :], new, mask=mask)
            else:
                tl.store(out_ptr + step[:, None] * P + cols[None, :], new, mask=mask)
        if PROJ:
            tl.debug_barrier()  # all of m_t written before it is projected
            for p0 in range(0, P, BLOCK_N):
                pcols = p0 + tl.arange(0, BLOCK_N)
                p_ok = pcols < P
                acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_ty)
                for k0 in range(0, H, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < H
                    m = tl.load(m_ptr + rows64[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                                other=0.0)
                    # w[k, n] = W_hr[n, k]
                    w = tl.load(w_hr_ptr + pcols[None, :] * H + ks[:, None], mask=k_ok[:, None] & p_ok[None, :],
                                other=0.0)
                    acc = tl.dot(m.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=acc_ty)
                tl.store(out_ptr + step[:, None] * P + pcols[None, :], acc, mask=row_ok[:, None] & p_ok[None, :])
        tl.debug_barrier()  # h_t, c_t (and m_t's reads) done before step t+1 reads or rewrites them


@triton.jit(do_not_specialize=["B", "T"])
def gated_bwd_kernel(
    grad_out_ptr,  # [T, B, P] dL/dh_t from the output (workspace dtype, as all but the weights)
    grad_cs_ptr,  # [T, B, H] dL/dc_t from the output (HAS_GRAD_CS)
    out_ptr,  # [T, B, P] the forward's h_1..h_T
    cs_ptr,  # [T, B, H] the forward's c_1..c_T (HAS_C)
    saved_ptr,  # [T, B, 4H] the forward's gates
    h0_ptr,  # [B, P] (zeros when the caller gave none)
    c0_ptr,  # [B, H] (HAS_C)
    w_hh_ptr,  # [G*H, P]
    w_hr_ptr,  # [P, H] (PROJ)
    grad_q_ptr,  # [T, B, G*H] out: dL/dq_t
    carry_h_ptr,  # [T+1, B, P]: slot T zero on entry; on exit slot t = dL/dh_{t-1} (slot 0: dL/dh0)
    share_ptr,  # [2, B, H] zero on entry: the share carried outside the product, ping-pong by step
    B,
    T,
    H,
    P,
    G: tl.constexpr,
    HAS_C: tl.constexpr,
    HAS_GRAD_CS: tl.constexpr,
    PROJ: tl.constexpr,
    N_ROWS_SCALED: tl.constexpr,  # the GRU: dL/da_n = dL/dq_n * r (n = tanh(q_n + r a_n))
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CELL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    GH = G * H
    acc_ty = out_ptr.dtype.element_ty
    for s in range(T):
        t = tl.cast(T - 1 - s, tl.int64)
        step = t * B + rows64
        g_out = grad_out_ptr + step * P
        g_next = carry_h_ptr + (step + B) * P  # slot t+1: the carry into h_t from step t+1
        s_t = saved_ptr + step * 4 * H
        # The share ping-pongs: this step reads what step t+1 wrote (slot s % 2: the carry into
        # c_t) and writes the other slot, so no element is read and rewritten in one phase.
        share_in = share_ptr + ((s % 2) * B + rows64) * H
        share_out = share_ptr + ((1 - s % 2) * B + rows64) * H
        if HAS_C:
            prev_rows = _rows_before(c0_ptr, cs_ptr, t, B, rows64, H)
        else:
            prev_rows = _rows_before(h0_ptr, out_ptr, t, B, rows64, P)
        # Phase A: the pointwise backward, per block of hidden units.
        for n0 in range(0, H, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < H
            mask = row_ok[:, None] & col_ok[None, :]
            offs = cols[None, :]
            if PROJ:  # the gradient at m_t: (dL/dh_t) W_hr
                gh = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_ty)
                for k0 in range(0, P, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < P
                    k_mask = row_ok[:, None] & k_ok[None, :]
                    g = tl.load(g_out[:, None] + ks[None, :], mask=k_mask, other=0.0) \
                        + tl.load(g_next[:, None] + ks[None, :], mask=k_mask, other=0.0)
                    # w[k, n] = W_hr[k, n]
                    w = tl.load(w_hr_ptr + ks[:, None] * H + offs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    gh = tl.dot(g.to(w.dtype), w, gh, input_precision=DOT_PRECISION, out_dtype=acc_ty)
            else:
                gh = tl.load(g_out[:, None] + offs, mask=mask, other=0.0) \
                    + tl.load(g_next[:, None] + offs, mask=mask, other=0.0)
            sv = s_t[:, None] + offs
            s0 = tl.load(sv, mask=mask, other=0.0)
            s1 = tl.load(sv + H, mask=mask, other=0.0)
            s2 = tl.load(sv + 2 * H, mask=mask, other=0.0)
            s3 = tl.load(sv + 3 * H, mask=mask, other=0.0)
            prev = tl.load(prev_rows[:, None] + offs, mask=mask, other=0.0)
            gc = gh  # the GRU: unused
            c = gh
            if HAS_C:
                gc = tl.load(share_in[:, None] + offs, mask=mask, other=0.0)
                if HAS_GRAD_CS:
                    gc += tl.load(grad_cs_ptr + step[:, None] * H + offs, mask=mask, other=0.0)
                c = tl.load(cs_ptr + step[:, None] * H + offs, mask=mask, other=0.0)
            d0, d1, d2, d3, share = _gated_step_backward(gh, gc, s0, s1, s2, s3, prev, c, CELL)
            dq = grad_q_ptr + step[:, None] * GH + offs
            tl.store(dq, d0, mask=mask)
            tl.store(dq + H, d1, mask=mask)
            tl.store(dq + 2 * H, d2, mask=mask)
            if G == 4:
                tl.store(dq + 3 * H, d3, mask=mask)
            tl.store(share_out[:, None] + offs, share, mask=mask)
        tl.debug_barrier()  # all of dz_t (and the share) written before phase B reads them
        # Phase B: the carry into h_{t-1} = da_t @ W_hh (+ the GRU's share), per block of P.
        dq_rows = grad_q_ptr + step * GH
        for p0 in range(0, P, BLOCK_N):
            pcols = p0 + tl.arange(0, BLOCK_N)
            p_ok = pcols < P
            p_mask = row_ok[:, None] & p_ok[None, :]
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=acc_ty)
            for k0 in range(0, GH, BLOCK_K):  # K runs over all G gate rows at once
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < GH
                k_mask = row_ok[:, None] & k_ok[None, :]
                da = tl.load(dq_rows[:, None] + ks[None, :], mask=k_mask, other=0.0)
                if N_ROWS_SCALED:  # r sits at saved[:, :H]; 1 outside the n rows
                    n_rows = (ks >= 2 * H) & k_ok
                    da *= tl.load(s_t[:, None] + (ks - 2 * H)[None, :], mask=row_ok[:, None] & n_rows[None, :],
                                  other=1.0)
                # w[k, n] = W_hh[k, n]
                w = tl.load(w_hh_ptr + ks[:, None] * P + pcols[None, :], mask=k_ok[:, None] & p_ok[None, :],
                            other=0.0)
                acc = tl.dot(da.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=acc_ty)
            if not HAS_C:  # the GRU's gh * z reaches h_{t-1} directly (P == H)
                acc += tl.load(share_out[:, None] + pcols[None, :], mask=p_mask, other=0.0)
            tl.store(carry_h_ptr + step[:, None] * P + pcols[None, :], acc, mask=p_mask)
        tl.debug_barrier()  # the carry into h_{t-1} written before step t-1 reads it


# ----------------------------------------------------------------------------------------------
# Launchers


class GatedConfig(NamedTuple):
    block_b: int
    block_n: int  # hidden units (forward, backward phase A) or columns of h (projection, phase B)
    block_k: int
    num_stages: int  # software pipelining of the K loops (Triton's default: 3)


def gated_config(B: int, H: int, P: int, dtype: torch.dtype, arch: int = 90,
                 interpret: bool = INTERPRET) -> GatedConfig:
    """The gated kernels' tiling for ``B`` rows, ``H`` units, ``h`` of width ``P`` (H, or
    proj_size < H) and the inputs' dtype on sm_<arch>. tl.dot needs every dimension >= 16."""
    h_block = max(16, triton.next_power_of_2(H))
    if interpret:
        # The interpreter's cost is per operation, not per element: the fewest, largest blocks.
        return GatedConfig(min(64, triton.next_power_of_2(B)), min(h_block, 128), min(h_block, 128), 1)
    # 16 rows x 32 units: the forward holds G accumulators of that size at once. K and the
    # pipelining are what compiles without a spill (python -m fused_rnn.compile_check --cells
    # lstm,gru, H = 1..1024, fp32/bf16/fp16: 0 spilled bytes on sm_90 and sm_80). ptxas's choices
    # are uneven, so are these: on sm_90 fp32 K = 64 where H and P are multiples of 16 (vector
    # loads), else K = 16 (K = 64 there: 255 registers + 512 bytes spilled); half types K = 32
    # (K = 64: up to 240 bytes). sm_80's ptxas caps registers lower (128-168): fp32 K = 16 and no
    # pipelining (3 stages: 8-104 bytes spilled at every K); half types K = 32, and K = 16 without
    # pipelining where H or P is not a multiple of 16 (K = 32 there: 32-40 bytes; 3 stages: 16
    # bytes in the LSTM's forward with a projection since the activations' exp is range-reduced).
    aligned = H % 16 == 0 and P % 16 == 0
    half = dtype in (torch.float16, torch.bfloat16)
    if arch >= 90:
        block_k, stages = (32 if half else 64 if dtype == torch.float32 and aligned else 16), 3
    else:
        block_k, stages = ((32, 3) if aligned else (16, 1)) if half else (16, 1)
    return GatedConfig(16, min(h_block, 32), min(h_block, block_k), stages)


def _dims(q, w_hh, cell):
    T, B = q.shape[:2]
    return T, B, w_hh.shape[0] // cell.gates, w_hh.shape[1]


def _initial(t, shape, like):
    """An initial state in the workspace dtype, contiguous; zeros for None."""
    return like.new_zeros(shape) if t is None else t.to(like.dtype).contiguous()


def gated_fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32=False, cell=cells.LSTM.name, keep_saved=True):
    """The forward recurrence: ``(out [T, B, P], cs [T, B, H] (the GRU: empty), saved [T, B, 4H])``
    in the workspace dtype, from ``q [T, B, G*H]`` (contiguous, as every input). The persistent
    kernels (`triton_gated_persistent.py`) run it where selected and planned, else the blocked
    ones; the reference loop answers where no kernel path passed its first-use self-check.
    ``saved`` is written whatever ``keep_saved`` (the op drops it for inference)."""
    _check_runnable(w_hh)
    spec = cells.get(cell)
    family, plan = _choose_path(q, w_hh, b_hh, w_hr, allow_tf32, spec)
    if family == "loop":
        return loop.gated_fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, spec)
    return _fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, spec, plan)


def _fwd(q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, cell, plan=None):
    T, B, H, P = _dims(q, w_hh, cell)
    ws = workspace_dtype(w_hh.dtype)
    out = torch.empty(T, B, P, device=q.device, dtype=ws)
    lstm = "c" in cell.state
    cs = torch.empty(T, B, H, device=q.device, dtype=ws) if lstm else out.new_empty(0)
    saved = torch.empty(T, B, 4 * H, device=q.device, dtype=ws)
    if T == 0 or B == 0:
        return out, cs, saved
    h_first = _initial(h0, (B, P), out)
    c_first = _initial(c0, (B, H), out) if lstm else h_first
    with _on_device(q):
        if plan is not None and _run_persistent(lambda error: _persistent_ops().gated_persistent_fwd(
                q, w_hh, b_hh, h_first, c_first, out, cs, saved, plan, error,
                stepwise=triton_rnn.PERSISTENT_STEPWISE, cell=cell), out):
            return out, cs, saved
        m = out.new_empty(B, H) if w_hr is not None else out
        cfg = gated_config(B, H, P, w_hh.dtype, _gpu(q.device)[1])
        gated_fwd_kernel[(triton.cdiv(B, cfg.block_b),)](
            q, w_hh, b_hh if b_hh is not None else w_hh, h_first, c_first,
            w_hr if w_hr is not None else w_hh, out, cs if lstm else out, saved, m,
            B, T, H, P,
            G=cell.gates, HAS_C=lstm, HAS_BIAS=b_hh is not None, PROJ=w_hr is not None,
            BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            DOT_PRECISION=_dot_precision(w_hh.dtype, allow_tf32), CELL=cell.name, num_stages=cfg.num_stages,
        )
    return out, cs, saved


def gated_bwd(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr, allow_tf32=False,
              cell=cells.LSTM.name):
    """Backward through all steps: ``(grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0, grad_w_hr)``
    in the workspace dtype, None for each input that was None."""
    _check_runnable(w_hh)
    spec = cells.get(cell)
    args = (grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, spec)
    family, plan = _choose_path(q, w_hh, b_hh, w_hr, allow_tf32, spec, backward=True)
    if family == "loop":  # the loop saves alike
        return loop.gated_bwd(*args)
    return _bwd(*args, plan)


def _bwd(grad_out, grad_cs, out, cs, saved, q, w_hh, b_hh, h0, c0, w_hr, allow_tf32, cell, plan=None):
    T, B, H, P = _dims(q, w_hh, cell)
    G, lstm = cell.gates, "c" in cell.state
    ws = out.dtype
    grad_out = grad_out.to(ws).contiguous()
    grad_cs = None if grad_cs is None or not lstm else grad_cs.to(ws).contiguous()
    h_first = _initial(h0, (B, P), out)
    c_first = _initial(c0, (B, H), out) if lstm else h_first
    grad_q = torch.empty(T, B, G * H, device=q.device, dtype=ws)
    carry_h = out.new_empty(T + 1, B, P)
    carry_h[T].zero_()
    share = out.new_zeros(2, B, H)
    with _on_device(q):
        ran = plan is not None and _run_persistent(lambda error: _persistent_ops().gated_persistent_bwd(
            grad_out, grad_cs, out, cs, saved, h_first, c_first, w_hh, grad_q, carry_h, share, plan, error,
            stepwise=triton_rnn.PERSISTENT_STEPWISE, cell=cell), out)
        if not ran:
            if plan is not None:
                share.zero_()  # the failed run's (NaN) shares
            cfg = gated_config(B, H, P, w_hh.dtype, _gpu(q.device)[1])
            gated_bwd_kernel[(triton.cdiv(B, cfg.block_b),)](
                grad_out, grad_cs if grad_cs is not None else grad_out, out, cs if lstm else out, saved,
                h_first, c_first, w_hh, w_hr if w_hr is not None else w_hh, grad_q, carry_h, share,
                B, T, H, P,
                G=G, HAS_C=lstm, HAS_GRAD_CS=grad_cs is not None, PROJ=w_hr is not None,
                N_ROWS_SCALED=cell is cells.GRU,
                BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                DOT_PRECISION=_dot_precision(w_hh.dtype, allow_tf32), CELL=cell.name, num_stages=cfg.num_stages,
            )
    # Everything else is parallel over all T*B rows: large GEMMs and reductions.
    da = grad_q
    if cell is cells.GRU:  # the gradient at the product: da_n = dq_n * r
        da = grad_q.clone()
        da[..., 2 * H:] *= saved[..., :H]
    # sum_t da_t^T h_{t-1}, with h_0 apart (no copy of out with h0 in front)
    grad_w_hh = da[1:].reshape(-1, G * H).t() @ out[:-1].reshape(-1, P)
    if h0 is not None:
        grad_w_hh += da[0].t() @ h_first
    grad_b_hh = da.sum((0, 1)) if b_hh is not None else None
    grad_w_hr = None
    if w_hr is not None:  # sum_t gh_t^T m_t, m_t = o tanh(c_t) recomputed
        gh = grad_out + carry_h[1:]
        m = saved[..., 3 * H:] * torch.tanh(cs)
        grad_w_hr = gh.reshape(-1, P).t() @ m.reshape(-1, H)
    grad_h0 = carry_h[0].clone() if h0 is not None else None  # not views of the workspaces
    grad_c0 = share[T % 2].clone() if lstm and c0 is not None else None
    return grad_q, grad_w_hh, grad_b_hh, grad_h0, grad_c0, grad_w_hr


# ----------------------------------------------------------------------------------------------
# First-use self-check (`self_check.py`; on CUDA only): each kernel path answers its first call in
# a process only after a small problem of the same tiling matched the float64 reference loop.


def _choose_path(q, w_hh, b_hh, w_hr, allow_tf32, cell, backward=False):
    """(family, persistent plan or None) that answers this call: the persistent kernels where
    selected (``FUSED_RNN_TRITON_KERNEL``: `triton_rnn._persistent_plan`) and planned, else the
    blocked ones; each only once its path has passed its first-use self-check, else the next one
    down, at the bottom the reference loop."""
    T, B, H, P = _dims(q, w_hh, cell)
    plan = _persistent_plan(B, T, H, w_hh, allow_tf32, gates=cell.gates, projection=w_hr is not None,
                            backward=backward)
    candidates = [("gated-persistent", plan)] if plan is not None else []
    candidates.append(("gated-blocked", None))
    for family, p in candidates:
        if _path_passes(family, p, B, H, P, w_hh, b_hh is not None, w_hr is not None, allow_tf32, cell):
            return family, p
    return "loop", None


def _path_passes(family, plan, B, H, P, w_hh, has_bias, proj, allow_tf32, cell) -> bool:
    dtype = w_hh.dtype
    precision = "tf32" if _dot_precision(dtype, allow_tf32) == "tf32" else str(dtype)[6:]
    if plan is not None:
        tiles = (f"tiles={plan.block_b}x{plan.block_n}", f"warps={plan.num_warps}")
    else:
        tiles = ("tiles={}x{}x{} stages={}".format(*gated_config(B, H, P, dtype, _gpu(w_hh.device)[1])),)
    path = (family, f"{cell.name}-cell", precision, f"H_PAD={max(16, triton.next_power_of_2(H))}",
            "H%16=0" if H % 16 == 0 else "H%16>0", "bias" if has_bias else "no-bias",
            f"proj P%16={P % 16}" if proj else "no-proj") + tiles
    return self_check.passes(path, w_hh.device, lambda: _check(
        cell, B, H, P, dtype, w_hh.device, allow_tf32, has_bias, proj, precision, plan))


def _check(cell, B, H, P, dtype, device, allow_tf32, has_bias, proj, precision, plan=None):
    """Our kernels (the persistent ones with ``plan``'s tiling, else the blocked ones) against the
    reference loop in float64 on T = 4 steps of at most 33 rows, with every optional input
    given: None if every output and gradient is within the precision's tolerance, else why not."""
    B, T, G = min(B, self_check.CHECK_MAX_ROWS), self_check.CHECK_STEPS, cell.gates
    if plan is not None:  # the same tiling on this problem's batch groups
        plan = dataclasses.replace(plan, groups=-(-B // plan.block_b))
    g = torch.Generator(device=device).manual_seed(1234)  # drawn on the device: no copy

    def rand(*shape, scale=1.0):  # float64 values that the kernels' dtype holds exactly
        u = torch.rand(shape, generator=g, device=device, dtype=torch.float64)
        return ((u * 2 - 1) * scale).to(dtype).double()

    lstm = "c" in cell.state
    args = dict(q=rand(T, B, G * H, scale=2.0), w_hh=rand(G * H, P, scale=1.5 * P ** -0.5),
                b_hh=rand(G * H, scale=0.5) if has_bias else None, h0=rand(B, P),
                c0=rand(B, H) if lstm else None, w_hr=rand(P, H, scale=H ** -0.5) if proj else None)
    grad_out, grad_cs = rand(T, B, P), rand(T, B, H) if lstm else None
    want = loop.gated_fwd(**args, allow_tf32=False, cell=cell)
    want += loop.gated_bwd(grad_out, grad_cs, *want, **args, allow_tf32=False, cell=cell)
    low = {k: None if v is None else v.to(dtype) for k, v in args.items()}
    got = _fwd(**low, allow_tf32=allow_tf32, cell=cell, plan=plan)
    ws = got[0].dtype
    got += _bwd(grad_out.to(ws), None if grad_cs is None else grad_cs.to(ws), *got, **low,
                allow_tf32=allow_tf32, cell=cell, plan=plan)
    names = ("out", "cs", "saved", "grad_q", "grad_w_hh", "grad_b_hh", "grad_h0", "grad_c0", "grad_w_hr")
    pairs = [(n, a, b) for n, a, b in zip(names, got, want) if b is not None and b.numel()]
    errors = torch.stack([(a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)
                          for _, a, b in pairs]).tolist()  # the check's one host sync
    if plan is not None and triton_rnn.persistent_disabled_reason() is not None:
        return triton_rnn.persistent_disabled_reason()  # it failed; the blocked kernels answered
    tolerance = self_check.TOLERANCE[precision]
    bad = [f"{n} relative error {e:.1e}" for (n, _, _), e in zip(pairs, errors) if not e <= tolerance]
    return f"{', '.join(bad)} (tolerance {tolerance:.0e})" if bad else None


def _persistent_ops():
    # Imported on first use: compiling its kernels' definitions costs import time.
    from . import triton_gated_persistent
    return triton_gated_persistent
