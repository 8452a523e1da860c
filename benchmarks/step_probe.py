"""Where a persistent step's time goes: the course-style step h_t = tanh(h_{t-1} @ W^T) under
several ways of forming the [BLOCK_B x H] x [H x BLOCK_N] product, with and without the group
barrier, timed on one GPU in one call (issue 30's tuning: the product, not the FMA rate, was the
suspect after the second GPU run).

    python benchmarks/step_probe.py [--shapes 64,512,256;256,512,256] [--variants dot-ieee-4w-16,...]
    python benchmarks/step_probe.py --compile-only --part 0/8   (fills Triton's cache; no timing)

A variant is PRODUCT-WARPS-BLOCK_N, PRODUCT one of
  dot-ieee, dot-tf32, dot-tf32x3  tl.dot at that input precision (the kernels' own: ieee)
  rows     one batch row at a time: tl.sum(a_b[:, None] * w, axis=0), W's tile in registers
  bcast    tl.sum(a[:, :, None] * w[None], axis=1): the whole tile as one reduction
  none     the loads and the store, no product (the step's memory and barrier cost alone)
  split-PRECISION-K_SPLIT  K in K_SPLIT chunks, summed (the kernels' own `_chunked_dot`)
A suffix adds an input q_t [B, T, H] after the product (as nn.RNN's cell: this program's columns):
  +q       loaded after the product (the forward kernels before the input was loaded in the wait)
  +qwait   loaded while the step before waits at its barrier (the forward kernels now)
Each is timed without the barrier (programs do not wait for each other: the step's own cost) and
with it (the real step), and its first step's error against float64 is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fused_rnn.ops.triton_cells import _activation  # noqa: E402
from fused_rnn.ops.triton_persistent import (_arrive, _chunked_dot, _k_chunks, _per_col, _per_row,  # noqa: E402
                                             _q_tile, _wait)

DEFAULT_VARIANTS = ",".join(
    [f"dot-{p}-{w}-{n}" for p in ("ieee", "tf32x3", "tf32") for w in (2, 4, 8) for n in (16, 32)]
    + [f"rows-{w}-{n}" for w in (4, 8) for n in (16, 32)]
    + [f"bcast-{w}-16" for w in (4, 8)]
    + ["none-4-16"])


@triton.jit
def step_probe_kernel(h_ptr, w_ptr, q_ptr, arrivals_ptr, error_ptr, B, T, H, spin_limit,
                      BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, H_PAD: tl.constexpr,
                      PRODUCT: tl.constexpr, PRECISION: tl.constexpr, BARRIER: tl.constexpr,
                      K_SPLIT: tl.constexpr = 1, INPUT: tl.constexpr = ""):
    group = tl.program_id(0)
    rows = group * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, H_PAD)
    row_ok, col_ok, k_ok = rows < B, cols < H, ks < H
    rows64 = rows.to(tl.int64)
    w = tl.load(w_ptr + cols[None, :].to(tl.int64) * H + ks[:, None],
                mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    if PRODUCT == "split":  # as the kernels do it (triton_persistent._k_chunks, _chunked_dot)
        k_row, k_col, in_mask3 = _k_chunks(row_ok, H, H_PAD, K_SPLIT)
        w3 = tl.load(w_ptr + _per_col(cols, K_SPLIT).to(tl.int64) * H + k_col,
                     mask=(k_col < H) & _per_col(col_ok, K_SPLIT), other=0.0)
    h_rows = h_ptr + rows64 * (T + 1) * H
    out_mask = row_ok[:, None] & col_ok[None, :]
    if INPUT == "qwait":  # q's rows of step t are rows64 * T + t (as the kernels' dense input)
        q = _q_tile(q_ptr, rows64 * T, cols, out_mask, T > 0, H)
    ok = tl.full([], 1, tl.int32)
    for t in range(0, T):
        t64 = tl.cast(t, tl.int64)
        h_prev = h_rows + t64 * H
        if PRODUCT == "rows":
            for b in tl.static_range(BLOCK_B):
                row = group * BLOCK_B + b
                row_base = h_ptr + tl.cast(row, tl.int64) * (T + 1) * H + t64 * H
                a_b = tl.load(row_base + ks, mask=k_ok & (row < B), other=0.0, cache_modifier=".cg")
                r = tl.sum(a_b[:, None] * w, axis=0)
                tl.store(row_base + H + cols, _activation(r, "elman_tanh"), mask=col_ok & (row < B))
        else:
            a = tl.load(h_prev[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                        cache_modifier=".cg")
            if PRODUCT == "dot":
                acc = tl.dot(a, w, input_precision=PRECISION, out_dtype=tl.float32)
            elif PRODUCT == "split":
                # K in K_SPLIT independent chunks: a batched dot, then the chunks' sum
                a3 = tl.load(_per_row(h_prev, K_SPLIT) + k_row, mask=in_mask3, other=0.0, cache_modifier=".cg")
                acc = _chunked_dot(a3, w3, PRECISION, K_SPLIT)
            elif PRODUCT == "bcast":
                acc = tl.sum(a[:, :, None] * w[None, :, :], axis=1)
            else:  # none: a stand-in that reads one column of a
                acc = tl.sum(tl.where(ks[None, :] == 0, a, 0.0), axis=1)[:, None] + tl.zeros(
                    [BLOCK_B, BLOCK_N], tl.float32)
            if INPUT == "q":
                acc += _q_tile(q_ptr, rows64 * T + t64, cols, out_mask, True, H)
            elif INPUT == "qwait":
                acc += q
            tl.store(h_prev[:, None] + H + cols[None, :], _activation(acc, "elman_tanh"), mask=out_mask)
        if BARRIER:
            _arrive(arrivals_ptr + group * T + t)
        if INPUT == "qwait":
            q = _q_tile(q_ptr, rows64 * T + t64 + 1, cols, out_mask, t + 1 < T, H)
        if BARRIER:
            still_ok = _wait(arrivals_ptr + group * T + t, tl.num_programs(1), spin_limit, ok)
            tl.store(error_ptr, 1, mask=(ok != 0) & (still_ok == 0))
            ok = still_ok


def parse(variant: str):
    variant, _, input_kind = variant.partition("+")
    if input_kind not in ("", "q", "qwait"):
        raise ValueError(f"unknown input {input_kind!r} in {variant!r}: +q or +qwait")
    parts = variant.split("-")
    product = parts[0]
    precision = parts[1] if product in ("dot", "split") else "ieee"
    k_split = int(parts[2]) if product == "split" else 1
    warps, block_n = int(parts[-2]), int(parts[-1])
    if input_kind and product == "rows":
        raise ValueError(f"{variant}: the rows product takes no input")
    return product, precision, warps, block_n, k_split, input_kind


def launch(variant, h, w, q, arrivals, error, T, barrier, spin_limit=1 << 20):
    product, precision, warps, block_n, k_split, input_kind = parse(variant)
    B, _, H = h.shape
    grid = (triton.cdiv(B, 16), triton.cdiv(H, block_n))
    return step_probe_kernel[grid](
        h, w, q, arrivals, error, B, T, H, spin_limit, BLOCK_B=16, BLOCK_N=block_n,
        H_PAD=triton.next_power_of_2(H), PRODUCT=product, PRECISION=precision, BARRIER=barrier,
        K_SPLIT=k_split, INPUT=input_kind,
        num_warps=warps, num_stages=1, launch_cooperative_grid=barrier)


def resident(compiled, grid_size: int) -> bool:
    """Whether a grid of this compiled kernel fits on the GPU at once (registers, shared, warps)."""
    props = torch.cuda.get_device_properties(0)
    warps = compiled.metadata.num_warps
    per_sm = min(65536 // max(1, compiled.n_regs * 32 * warps),
                 (228 * 1024) // max(1, compiled.metadata.shared + 1024), 64 // warps, 32)
    return grid_size <= per_sm * props.multi_processor_count


def time_ms(fn, reps=15) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64,512,256;256,512,256")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--part", default="0/1", help="i/n: this process takes every n-th variant from i")
    args = ap.parse_args(argv)
    index, parts = (int(v) for v in args.part.split("/"))
    variants = args.variants.split(",")[index::parts]
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    dev = torch.device("cuda")
    if not args.compile_only:
        print(f"# {torch.cuda.get_device_name()}, fp32, do not compare across calls")
        print("| B | T | H | variant | regs | spill | no barrier ms | us/step | barrier ms | us/step | step-1 err |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, T, H in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(H, H, device=dev, generator=g) / H ** 0.5
        h0 = torch.randn(B, H, device=dev, generator=g)
        q = torch.randn(B, T, H, device=dev, generator=g)
        for variant in variants:
            _, _, _, block_n, _, input_kind = parse(variant)
            exact = torch.tanh(h0.double() @ w.double().T + (q[:, 0].double() if input_kind else 0))
            h = torch.zeros(B, T + 1, H, device=dev)
            h[:, 0] = h0
            error = torch.zeros(1, device=dev, dtype=torch.int32)
            arrivals = torch.zeros(triton.cdiv(B, 16) * T, device=dev, dtype=torch.int32)
            grid_size = triton.cdiv(B, 16) * triton.cdiv(H, block_n)
            try:
                k = launch(variant, h, w, q, arrivals, error, T, False)
                if args.compile_only:
                    launch(variant, h, w, q, arrivals, error, T, True)
                    torch.cuda.synchronize()
                    print("compiled", variant, B, T, H, flush=True)
                    continue
                free = time_ms(lambda: launch(variant, h, w, q, arrivals, error, T, False))
                regs, spill = k.n_regs, k.n_spills
                if resident(k, grid_size):
                    def with_barrier():
                        arrivals.zero_()
                        launch(variant, h, w, q, arrivals, error, T, True)
                    held = time_ms(with_barrier)
                    err = (h[:, 1].double() - exact).abs().max().item()
                    bad = " (barrier timed out)" if error.item() else ""
                    held_txt = f"{held:.3f} | {1000 * held / T:.2f} | {err:.1e}{bad}"
                else:
                    held_txt = "not resident | | "
                print(f"| {B} | {T} | {H} | {variant} | {regs} | {spill} | {free:.3f} | {1000 * free / T:.2f} | "
                      f"{held_txt} |", flush=True)
            except Exception as exc:  # a variant that does not compile or launch
                print(f"| {B} | {T} | {H} | {variant} | | | failed: {type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:100] if str(exc) else ''} | | | | |", flush=True)


if __name__ == "__main__":
    main()
