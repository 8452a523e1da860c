"""A/B of the C++ CPU extension: this checkout's build against one built from another git revision's
``csrc/`` with that revision's compiler flags, both loaded in one process and timed in interleaved rounds (A, B, A, B, ...), so that a
change to the C++ source is measured without machine drift between two runs.

    python benchmarks/ab_cpu_ext.py --before HEAD~1 [--rounds 15] [--cells course,elman_tanh]

Times the extension's own entry points (``rnn_fwd``; ``rnn_fwd`` + ``rnn_bwd``) at the CPU
benchmark's shapes (``bench_rnn.py --shapes cpu``), the input projection excluded (it is the same
``F.linear`` for both). Prints one markdown row per cell, shape and mode: medians and after/before.
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from bench_rnn import median_ms  # the interleaved medians every benchmark here uses
from fused_rnn.ops import cpu_ext

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(512, 8, 256), (64, 256, 256), (256, 64, 512)]  # (B, T, H), bench_rnn's "cpu" set
V = 85


def build_revision(rev: str):
    """The extension built from ``rev``'s ``csrc/fused_rnn_cpu.cpp`` under its own module name."""
    source = subprocess.run(["git", "show", f"{rev}:csrc/fused_rnn_cpu.cpp"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    # the revision's own flags (setup.py's CPU_FLAGS), so that a change of flags is measured too
    setup = subprocess.run(["git", "show", f"{rev}:setup.py"], cwd=ROOT, check=True, capture_output=True,
                           text=True).stdout
    flags = ast.literal_eval(re.search(r"^CPU_FLAGS = (\[[^\]]*\])", setup, re.M).group(1))
    folder = Path(tempfile.mkdtemp(prefix="fused_rnn_ab_"))
    path = folder / "fused_rnn_cpu.cpp"
    path.write_text(source)
    return load(name=f"fused_rnn_cpu_{sha}", sources=[str(path)], extra_cflags=flags,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [], build_directory=str(folder))


def problem(cell: str, B: int, T: int, H: int, g: torch.Generator):
    def rand(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g) * 2 - 1) * scale

    w_h = rand(H, H, scale=H ** -0.5)
    if cell == "course":  # token input: the [V, H] table, as fused_rnn passes it
        return dict(proj=rand(V, H), ids=torch.randint(0, V, (B, T), generator=g), w_h=w_h, b_h=rand(H, scale=0.5),
                    h0=None)
    return dict(proj=rand(T, B, H), ids=None, w_h=w_h, b_h=None, h0=None)  # q, time-major


def step(ext, args, cell, mode):
    def fwd():
        return ext.rnn_fwd(args["proj"], args["ids"], args["w_h"], args["b_h"], args["h0"], cell)

    if mode == "fwd":
        return fwd
    out = fwd()
    grad_out = torch.randn(out.shape[1], out.shape[0], out.shape[2])  # [B, T, H]
    grad_h_n = torch.randn(out.shape[1], out.shape[2])

    def fwd_bwd():
        states = fwd()
        return ext.rnn_bwd(grad_out, grad_h_n, states, args["h0"], args["proj"], args["ids"], args["w_h"],
                           args["b_h"] is not None, cell)
    return fwd_bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="git revision whose csrc/ is the baseline")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cells", default="course,elman_tanh,elman_relu")
    args = ap.parse_args(argv)
    before, after = build_revision(args.before), cpu_ext.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; before = {args.before}, "
          f"after = this checkout\n")
    print("| cell | B, T, H | mode | before ms | after ms | after / before |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for cell in args.cells.split(","):
        for B, T, H in SHAPES:
            data = problem(cell, B, T, H, g)
            for mode in ("fwd", "fwd+bwd"):
                with torch.no_grad():
                    ms = median_ms({"before": step(before, data, cell, mode), "after": step(after, data, cell, mode)},
                                   torch.device("cpu"), rounds=args.rounds, budget_s=float("inf"))
                print(f"| {cell} | {B}, {T}, {H} | {mode} | {ms['before']:.2f} | {ms['after']:.2f} | "
                      f"{ms['after'] / ms['before']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
