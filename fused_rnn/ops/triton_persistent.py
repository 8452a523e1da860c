"""Persistent split-H kernels: one launch runs all T steps across the whole GPU, W_h on chip.

Program ``(g, j)`` owns batch rows block ``g`` (a *group*) and output columns block ``j``. It
loads its ``[H, BLOCK_N]`` slice of ``W_h`` once; each step it reads the full-width previous
state of its group (written by its sibling programs), computes its columns, stores them, and
waits at a barrier shared only by the group's ``col_blocks`` programs: one counter per
(group, step), a release ``atomic_add`` to arrive and a bounded acquire spin to wait (a fresh
counter per step, so nothing is ever reset; no whole-grid barrier).

    forward   h_t[g, j] = tanh((h_{t-1}[g, :] + relu(p_t[g, :])) @ W_h[j, :]^T + b_h[j])
    backward  c_t[g, j] = ((g_t + c_{t+1})[g, :] * (1 - h_t[g, :]^2)) @ W_h[:, j]

or, with the ``CELL`` constexpr set to one of nn.RNN's own cells (`cells.py`), q = proj with
both biases in it:

    forward   h_t[g, j] = act(h_{t-1}[g, :] @ W_h[j, :]^T + q_t[g, j]),  act = tanh or relu
    backward  c_t[g, j] = ((g_t + c_{t+1})[g, :] * act'(h_t[g, :])) @ W_h[:, j]

A step's product runs as ``Plan.k_split`` independent dots over chunks of K, summed
(`_chunked_dot`): one fp32 dot over all of H waits on each operand load (`planner.K_CHUNK`).
The forward loads a step's input rows (the token ids) and q (where it joins after the product)
between its arrival at the barrier of the step before and its wait there: no sibling writes
them, so the loads are in flight while the program waits instead of on the step's path.

Never hang, never silently wrong: the grid is launched cooperatively (a grid that cannot be
resident at once fails at launch), every spin is bounded, and a program whose wait times out
sets an error flag and writes NaN into every output it owns from then on (so a wrong result
cannot pass unnoticed; the launcher in `triton_rnn.py` reads the flag and stops using this path).

Stepwise mode (``STEPWISE=True``): the same kernels run one step per launch, the launch
boundary standing in for the barrier. The Triton interpreter runs programs one after another,
so that is how CI tests the split tiling on CPU; only the barrier itself is left to the GPU.
The tiling comes from `planner.plan_persistent`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .planner import Plan
from .. import cells
from .triton_cells import _activation, _activation_grad, _input_before_product

# Spin iterations before a barrier wait gives up. One acquire load round trip is ~1 us, so this
# is seconds: far past any real step (~us), short enough that a broken barrier fails the call.
SPIN_LIMIT = 1 << 22


@triton.jit
def _group_barrier(arrivals_ptr, n_arrivals, spin_limit, ok):
    """Arrive at this (group, step)'s counter and wait until ``n_arrivals`` programs have.
    Returns ``ok`` (int32 0/1) cleared if the wait timed out; a program already failed
    arrives but does not wait, so its siblings are not held up by it."""
    _arrive(arrivals_ptr)
    return _wait(arrivals_ptr, n_arrivals, spin_limit, ok)


@triton.jit
def _arrive(arrivals_ptr):
    """The barrier's first half: this program's stores of the step are released to the group.
    Loads issued between `_arrive` and `_wait` are in flight while the program waits."""
    # Every thread's stores of this step are issued before the (cumulative) release.
    tl.debug_barrier()
    tl.atomic_add(arrivals_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(arrivals_ptr, n_arrivals, spin_limit, ok):
    """The barrier's second half: a bounded acquire spin until ``n_arrivals`` have arrived."""
    seen = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")
    spins = 0
    while (seen < n_arrivals) & (spins < spin_limit) & (ok != 0):
        seen = tl.atomic_add(arrivals_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()  # no thread reads the siblings' columns before the acquire
    return ok & (seen >= n_arrivals).to(tl.int32)


@triton.jit
def _program_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr):
    """Program (g, j)'s tile: its group g of batch rows (as int64: B*T*H passes 2^31 at realistic
    sizes), its column block j, all of K, and their masks."""
    group = tl.program_id(0)
    rows = group * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, H_PAD)
    row_ok, col_ok, k_ok = rows < B, cols < H, ks < H
    in_mask = row_ok[:, None] & k_ok[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    return group, tl.num_programs(1), rows.to(tl.int64), row_ok, cols, col_ok, ks, k_ok, in_mask, out_mask


@triton.jit
def _k_chunks(row_ok, H, H_PAD: tl.constexpr, K_SPLIT: tl.constexpr):
    """All of K as K_SPLIT chunks of KC = H_PAD / K_SPLIT: the offsets of a row operand's columns
    ([K_SPLIT, 1, KC]), of a weight tile's rows ([K_SPLIT, KC, 1]), and the row operand's mask
    (``row_ok`` and k < H); K_SPLIT = 1: plain [1, H_PAD] and [H_PAD, 1], a single dot (what
    `_per_row`, `_per_col` and `_chunked_dot` follow)."""
    KC: tl.constexpr = H_PAD // K_SPLIT
    if K_SPLIT == 1:
        k_row = tl.arange(0, H_PAD)[None, :]
        k_col = tl.arange(0, H_PAD)[:, None]
    else:
        first = tl.arange(0, K_SPLIT) * KC
        k_row = first[:, None, None] + tl.arange(0, KC)[None, None, :]
        k_col = first[:, None, None] + tl.arange(0, KC)[None, :, None]
    return k_row, k_col, _per_row(row_ok, K_SPLIT) & (k_row < H)


@triton.jit
def _per_row(x, K_SPLIT: tl.constexpr):
    """A [BLOCK_B] vector (row offsets, masks) broadcast against `_k_chunks`' row offsets."""
    if K_SPLIT == 1:
        y = x[:, None]
    else:
        y = x[None, :, None]
    return y


@triton.jit
def _per_col(x, K_SPLIT: tl.constexpr):
    """A [BLOCK_N] vector broadcast against `_k_chunks`' weight-row offsets."""
    if K_SPLIT == 1:
        y = x[None, :]
    else:
        y = x[None, None, :]
    return y


@triton.jit
def _chunked_dot(a, w, DOT_PRECISION: tl.constexpr, K_SPLIT: tl.constexpr):
    """[K_SPLIT, BLOCK_B, KC] x [K_SPLIT, KC, BLOCK_N] summed over the chunks: K_SPLIT independent
    FMA chains. One [BLOCK_B, H] x [H, BLOCK_N] fp32 dot is one chain per output that waits on
    each operand load from shared memory: half as fast at H=256 (benchmarks/step_probe.py)."""
    if K_SPLIT == 1:
        acc = tl.dot(a, w, input_precision=DOT_PRECISION, out_dtype=a.dtype)
    else:
        acc = tl.sum(tl.dot(a, w, input_precision=DOT_PRECISION, out_dtype=a.dtype), axis=0)
    return acc


@triton.jit
def _input_rows(ids_ptr, rows64, row_ok, t, step_end, T, TOKENS: tl.constexpr):
    """Which rows of ``proj`` hold step t's input: the tokens' (a load) or the sequence's own."""
    t64 = tl.cast(t, tl.int64)
    if TOKENS:
        src = tl.load(ids_ptr + rows64 * T + t64, mask=row_ok & (t < step_end), other=0)
    else:
        src = rows64 * T + t64
    return src


@triton.jit
def _q_tile(proj_ptr, src, cols, out_mask, live, H):
    """q of the rows ``src``, this program's columns (zeros unless ``live``)."""
    return tl.load(proj_ptr + (src * H)[:, None] + cols[None, :], mask=out_mask & live, other=0.0)


@triton.jit(do_not_specialize=["B", "T", "step_begin", "step_end", "spin_limit"])
def rnn_persistent_fwd_kernel(
    proj_ptr,  # [R, H]: rows of p (R = V for token input, B*T for dense input)
    ids_ptr,  # [B, T] int64 token ids (token input only)
    w_h_ptr,  # [H, H]
    b_h_ptr,  # [H]
    h_ptr,  # [B, T+1, H] state workspace: h[:, 0] = h0 on entry, h[:, t+1] = h_t on exit
    arrivals_ptr,  # [groups, T] int32 zeros: the barrier counters
    error_ptr,  # [1] int32: set to 1 when a barrier wait times out
    B,
    T,
    H,
    step_begin,  # steps [step_begin, step_end) run in this launch (all of them unless stepwise)
    step_end,
    spin_limit,
    TOKENS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    H_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STEPWISE: tl.constexpr,
    CELL: tl.constexpr,  # cells.Cell.name
    INPUT_BEFORE_PRODUCT: tl.constexpr,  # cells.Cell.input_before_product
    K_SPLIT: tl.constexpr,  # K in this many chunks (Plan.k_split)
):
    group, n_col_blocks, rows64, row_ok, cols, col_ok, _, _, _, out_mask = _program_tile(
        B, H, BLOCK_B, BLOCK_N, H_PAD)
    k_row, k_col, in_mask = _k_chunks(row_ok, H, H_PAD, K_SPLIT)
    # This program's slice of W_h, on chip for all steps: w[c, k, n] = W_h[n, c*KC + k]. Products
    # run in the workspace dtype (fp32 for bf16/fp16 weights, upcast once): a 16-row tile gains
    # nothing from tensor cores, and bf16 mma tiles with the whole of H as K spill at H=512 (sm_90).
    w = tl.load(w_h_ptr + _per_col(cols, K_SPLIT).to(tl.int64) * H + k_col,
                mask=(k_col < H) & _per_col(col_ok, K_SPLIT), other=0.0).to(h_ptr.dtype.element_ty)
    if HAS_BIAS:
        bias = tl.load(b_h_ptr + cols, mask=col_ok, other=0.0).to(h_ptr.dtype.element_ty)
    h_rows = h_ptr + rows64 * (T + 1) * H
    # No sibling writes the input, so a step's input loads go out while the step before waits at
    # its barrier, not after the wait: its rows src (for token input, the ids: a round trip before
    # p's rows can be loaded) and q, which joins after the product (where a load waited on the
    # product). p, all of K, is loaded with h after the wait: held across a step it spilled.
    src = _input_rows(ids_ptr, rows64, row_ok, step_begin, step_end, T, TOKENS)
    if not INPUT_BEFORE_PRODUCT:
        q = _q_tile(proj_ptr, src, cols, out_mask, step_begin < step_end, H)
    ok = tl.full([], 1, tl.int32)
    for t in range(step_begin, step_end):
        h_prev = h_rows + tl.cast(t, tl.int64) * H
        # .cg: the siblings' columns were written by other SMs; read them from L2, not L1.
        a = tl.load(_per_row(h_prev, K_SPLIT) + k_row, mask=in_mask, other=0.0, cache_modifier=".cg")
        if INPUT_BEFORE_PRODUCT:
            p = tl.load(proj_ptr + _per_row(src * H, K_SPLIT) + k_row, mask=in_mask, other=0.0)
            a = _input_before_product(a, p.to(a.dtype))
        acc = _chunked_dot(a, w, DOT_PRECISION, K_SPLIT)
        if not INPUT_BEFORE_PRODUCT:  # the input enters after the product: only this program's columns
            # (the select keeps the compiler from folding q into the product as its accumulator,
            # which spills at fp32 H=256 on sm_90: 9 KB; a failed program's states are NaN anyway)
            acc = tl.where(ok != 0, acc, float("nan"))
            acc += q.to(acc.dtype)
        if HAS_BIAS:
            acc += bias[None, :]
        h_t = tl.where(ok != 0, _activation(acc, CELL), float("nan"))
        tl.store(h_prev[:, None] + H + cols[None, :], h_t, mask=out_mask)
        if not STEPWISE:
            _arrive(arrivals_ptr + group * T + t)
        src = _input_rows(ids_ptr, rows64, row_ok, t + 1, step_end, T, TOKENS)
        if not INPUT_BEFORE_PRODUCT:
            q = _q_tile(proj_ptr, src, cols, out_mask, t + 1 < step_end, H)
        if not STEPWISE:
            still_ok = _wait(arrivals_ptr + group * T + t, n_col_blocks, spin_limit, ok)
            tl.store(error_ptr, 1, mask=(ok != 0) & (still_ok == 0))
            ok = still_ok


@triton.jit(do_not_specialize=["B", "T", "step_begin", "step_end", "spin_limit"])
def rnn_persistent_bwd_kernel(
    grad_out_ptr,  # [B, T, H] dL/dh_t from the output (workspace dtype)
    h_ptr,  # [B, T+1, H] the forward's state workspace
    w_h_ptr,  # [H, H]
    c_ptr,  # [B, T+1, H]: c[:, T] = dL/dh_n on entry; c[:, t] = dz_t @ W_h on exit
    arrivals_ptr,  # [groups, T] int32 zeros
    error_ptr,  # [1] int32
    B,
    T,
    H,
    step_begin,  # reverse steps s = T-1-t in [step_begin, step_end) run in this launch
    step_end,
    spin_limit,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    H_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STEPWISE: tl.constexpr,
    CELL: tl.constexpr,  # cells.Cell.name: which activation's gradient
    K_SPLIT: tl.constexpr,
):
    group, n_col_blocks, rows64, row_ok, cols, col_ok, _, _, _, out_mask = _program_tile(
        B, H, BLOCK_B, BLOCK_N, H_PAD)
    k_row, k_col, in_mask = _k_chunks(row_ok, H, H_PAD, K_SPLIT)
    # w[c, k, n] = W_h[c*KC + k, n]
    w = tl.load(w_h_ptr + k_col.to(tl.int64) * H + _per_col(cols, K_SPLIT),
                mask=(k_col < H) & _per_col(col_ok, K_SPLIT), other=0.0).to(c_ptr.dtype.element_ty)
    ws_rows = rows64 * (T + 1) * H
    go_rows = rows64 * T * H
    ok = tl.full([], 1, tl.int32)
    for s in range(step_begin, step_end):
        t = tl.cast(T - 1 - s, tl.int64)
        c_next = c_ptr + ws_rows + (t + 1) * H
        g = tl.load(grad_out_ptr + _per_row(go_rows, K_SPLIT) + t * H + k_row, mask=in_mask, other=0.0) \
            + tl.load(_per_row(c_next, K_SPLIT) + k_row, mask=in_mask, other=0.0, cache_modifier=".cg")
        h = tl.load(h_ptr + _per_row(ws_rows, K_SPLIT) + (t + 1) * H + k_row, mask=in_mask, other=0.0)
        dz = _activation_grad(g, h, CELL)
        acc = _chunked_dot(dz, w, DOT_PRECISION, K_SPLIT)
        c_t = tl.where(ok != 0, acc, float("nan"))
        tl.store(c_next[:, None] - H + cols[None, :], c_t, mask=out_mask)
        if not STEPWISE:
            still_ok = _group_barrier(arrivals_ptr + group * T + s, n_col_blocks, spin_limit, ok)
            tl.store(error_ptr, 1, mask=(ok != 0) & (still_ok == 0))
            ok = still_ok


# ----------------------------------------------------------------------------------------------
# Launchers. Each runs the kernel over all steps into a workspace the caller allocated and
# returns nothing; a timed-out barrier shows in ``error`` (and as NaN in the workspace).


# No software pipelining of the step loop: it would issue the next step's loads of the siblings'
# columns before this step's barrier has been passed.
NUM_STAGES = 1


def _launch(kernel, plan: Plan, args: tuple, T: int, stepwise: bool, spin_limit, constexprs: dict):
    spin_limit = SPIN_LIMIT if spin_limit is None else spin_limit
    if stepwise:
        for step in range(T):  # the launch boundary is the barrier
            kernel[plan.grid](*args, step, step + 1, spin_limit, STEPWISE=True, **constexprs,
                              num_warps=plan.num_warps, num_stages=NUM_STAGES)
    else:
        # Cooperative: a grid that cannot be resident at once fails here instead of hanging.
        kernel[plan.grid](*args, 0, T, spin_limit, STEPWISE=False, **constexprs,
                          num_warps=plan.num_warps, num_stages=NUM_STAGES, maxnreg=plan.max_registers,
                          launch_cooperative_grid=True)


def persistent_fwd(proj, ids, w_h, b_h, ws, plan: Plan, error, *, stepwise: bool,
                   spin_limit: int | None = None, cell=cells.COURSE) -> None:
    """Fills ``ws [B, T+1, H]`` (``ws[:, 0]`` set by the caller) with ``h_1..h_T``."""
    B, T1, H = ws.shape
    T = T1 - 1
    arrivals = torch.zeros(plan.groups * T, device=ws.device, dtype=torch.int32)
    args = (proj, ids if ids is not None else proj, w_h, b_h if b_h is not None else w_h, ws,
            arrivals, error, B, T, H)
    _launch(rnn_persistent_fwd_kernel, plan, args, T, stepwise, spin_limit, dict(
        TOKENS=ids is not None, HAS_BIAS=b_h is not None, BLOCK_B=plan.block_b,
        BLOCK_N=plan.block_n, H_PAD=plan.h_pad, K_SPLIT=plan.k_split,
        DOT_PRECISION=plan.precision, CELL=cells.get(cell).name,
        INPUT_BEFORE_PRODUCT=cells.get(cell).input_before_product))


def persistent_bwd(grad_out, ws, w_h, c, plan: Plan, error, *, stepwise: bool,
                   spin_limit: int | None = None, cell=cells.COURSE) -> None:
    """Fills ``c [B, T+1, H]`` (``c[:, T]`` set by the caller) with ``c_0..c_{T-1}``."""
    B, T1, H = ws.shape
    T = T1 - 1
    arrivals = torch.zeros(plan.groups * T, device=ws.device, dtype=torch.int32)
    args = (grad_out, ws, w_h, c, arrivals, error, B, T, H)
    _launch(rnn_persistent_bwd_kernel, plan, args, T, stepwise, spin_limit, dict(
        BLOCK_B=plan.block_b, BLOCK_N=plan.block_n, H_PAD=plan.h_pad, K_SPLIT=plan.k_split,
        DOT_PRECISION=plan.precision, CELL=cells.get(cell).name))
