"""The persistent kernels under each tiling the planner could pick for a shape, against the
blocked kernels and cuDNN, in one short GPU call: the measurements issue 30's tuning starts from
(which tiling wins per H and B, and by how much).

    python benchmarks/tune_persistent.py [--cells course,elman,lstm,gru] [--shapes 64,512,256;256,512,256]
                                         [--modes fwd,fwd+bwd] [--tilings 16x32x4x2,...]
    python benchmarks/tune_persistent.py --cpu-dry-run   (each variant's plan, no timing: the
                                                           script checked on a machine without a GPU)

A variant is one tiling of the planner's table for the shape's padded H (``planner._TABLES``), or
one given with ``--tilings`` as BLOCK_BxBLOCK_NxWARPSxPROGRAMS_PER_SM[xK_CHUNK] (a tiling the table leaves
out, at the co-residency it is said to reach; a grid that needs more is skipped, and one that is
not really resident fails the call at its barrier's time-out). Shapes are B,T,H; the dense cells'
input size is H. Times: ``triton.testing.do_bench`` medians (bench_rnn.py's providers and steps),
the self-check off (each variant is a new kernel configuration).
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import torch

os.environ.setdefault("FUSED_RNN_SELF_CHECK", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rnn import (GATES, V, make_dense_params, make_dense_providers, make_params,  # noqa: E402
                       make_providers, make_step, median_ms)
from fused_rnn.ops import planner  # noqa: E402

DRY_RUN_GPU = (132, 90)  # an H100/H200's SM count and arch, for the dry run's plans


def parse_tiling(text: str) -> planner.Tiling:
    """BLOCK_BxBLOCK_NxWARPSxPROGRAMS_PER_SM[xK_CHUNK] (K_CHUNK default: planner.K_CHUNK)."""
    block_b, block_n, warps, per_sm, *k_chunk = (int(v) for v in text.split("x"))
    return planner.Tiling(block_b, block_n, warps, per_sm, per_sm, k_chunk=k_chunk[0] if k_chunk else 0)


def variants(cell: str, H: int, extra: list) -> list:
    """The tilings to time for a cell at hidden size H: the table's for its H_PAD, then ``extra``."""
    table = planner._TABLES[(GATES[cell], 90)]
    return list(table.get(planner.padded_h(H), [])) + extra


@contextmanager
def only_tiling(cell: str, H: int, tiling: planner.Tiling):
    """The planner's table for this cell and H_PAD holds ``tiling`` alone (on every arch's table)."""
    h_pad = planner.padded_h(H)
    tables = [planner._TABLES[(GATES[cell], arch)] for arch in (90, 80)]
    saved = [t.get(h_pad) for t in tables]
    for t in tables:
        t[h_pad] = [tiling]
    try:
        yield
    finally:
        for t, old in zip(tables, saved):
            if old is None:
                t.pop(h_pad, None)
            else:
                t[h_pad] = old


def gpu():
    props = torch.cuda.get_device_properties(0)
    return props.multi_processor_count, props.major * 10 + props.minor


def problem(cell: str, B: int, T: int, H: int, device):
    """(providers {name: (fn, weights)}, x) for bench_rnn's cuDNN peer and both Triton families."""
    names = ["nnrnn", "fused-blocked", "fused-persistent"]
    if cell == "course":
        params = make_params(H, torch.float32, device)
        x = torch.randint(0, V, (B, T), device=device)
        return make_providers(names, params, x), x
    params = make_dense_params(GATES[cell], H, H, torch.float32, device)
    x = torch.randn(B, T, H, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
    return make_dense_providers(cell, names, params, x), x


def time_persistent(providers, x, mode, device) -> float:
    """The persistent provider's median time; a fallback to the blocked kernels is an error here
    (it would time the wrong kernels), and the next variant starts from a clean state."""
    import warnings

    from fused_rnn.ops import triton_rnn
    triton_rnn.reset_persistent_state()
    fn, w = providers["fused-persistent"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", triton_rnn.PersistentKernelWarning)
        return median_ms({"p": make_step(fn, w, x, mode)}, device)["p"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="course,elman,lstm,gru")
    ap.add_argument("--shapes", default="64,512,256;256,512,256")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--tilings", default="", help="extra tilings, BxNxWARPSxPER_SM, comma-separated")
    ap.add_argument("--cpu-dry-run", action="store_true", help="print each variant's plan; time nothing")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    extra = [parse_tiling(t) for t in args.tilings.split(",") if t]
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("tune_persistent: needs a CUDA GPU (or --cpu-dry-run)")
    sm_count, arch = DRY_RUN_GPU if dry else gpu()
    device = torch.device("cpu" if dry else "cuda")
    print(f"# {'dry run: plans for ' if dry else ''}{sm_count} SMs, sm_{arch}, fp32 IEEE")
    print("| cell | B | T | H | mode | variant | grid | per SM | ms | cuDNN / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cell in args.cells.split(","):
        for B, T, H in shapes:
            if not dry:
                providers, x = problem(cell, B, T, H, device)
            for mode in args.modes.split(","):
                base = {}
                if not dry:
                    steps = {k: make_step(fn, w, x, mode) for k, (fn, w) in providers.items()
                             if k in ("nnrnn", "fused-blocked")}
                    base = median_ms(steps, device)
                    for name, ms in base.items():
                        print(f"| {cell} | {B} | {T} | {H} | {mode} | {name} | | | {ms:.3f} | "
                              f"{base['nnrnn'] / ms:.2f} |", flush=True)
                for tiling in variants(cell, H, extra):
                    with only_tiling(cell, H, tiling):
                        plan = planner.plan_persistent(B, H, torch.float32, sm_count, arch=arch,
                                                       gates=GATES[cell])
                        label = f"{tiling.block_b}x{tiling.block_n} {tiling.warps}w K/{plan.k_split}"
                        if not plan.fits:
                            print(f"| {cell} | {B} | {T} | {H} | {mode} | {label} | - | - | not planned: "
                                  f"{plan.reason} | |")
                            continue
                        ms = None
                        if not dry:
                            try:
                                ms = time_persistent(providers, x, mode, device)
                            except Exception as exc:  # a launch that fails, a barrier that times out
                                print(f"| {cell} | {B} | {T} | {H} | {mode} | {label} | "
                                      f"{plan.groups}x{plan.col_blocks} | {plan.programs_per_sm} | failed: "
                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]} | |", flush=True)
                                continue
                    grid = f"{plan.groups}x{plan.col_blocks}"
                    timed = "-" if ms is None else f"{ms:.3f}"
                    ratio = "" if ms is None else f"{base['nnrnn'] / ms:.2f}"
                    print(f"| {cell} | {B} | {T} | {H} | {mode} | {label} | {grid} | {plan.programs_per_sm} | "
                          f"{timed} | {ratio} |", flush=True)
    if dry:
        print("dry run: done")


if __name__ == "__main__":
    main()
