"""The products' own FLOP rate inside the CPU recurrences, against the machine's FMA peak.

The C++ extension can count the time stamp counter ticks its panel products take (every tile,
every thread: ``time_products``); this runs each recurrence alone (the extension's forward and
backward, float32, with h0, so that every step has its product) with the count on, and reports
beside the call's wall time the products' share of it and their FLOP rate while they run:
    products' seconds per thread = ticks / tick rate / threads
    products' rate = product FLOPs / products' seconds per thread
The forward's products are h_{t-1} W_hh^T (the course cell's: (h_{t-1} + relu(p_t)) W_h^T), and
for the gated cells' inference and the Elman cell's "x inside" also x_t W_ih^T inside the loop;
the backward's the carry da_t W_hh and the weight gradient sum_t da_t^T h_{t-1}.

    python benchmarks/product_rate.py [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fma_peak import peak_probe
from fused_rnn import cells
from fused_rnn.ops import cpu_ext

SHAPES = [(512, 8, 64, 256), (64, 256, 128, 256), (256, 64, 256, 512)]  # B, T, I, H: bench_rnn's CPU shapes


def problems(cell: str, B: int, T: int, I: int, H: int):
    """(name, call, product FLOPs) for the cell's forward, inference (gated cells) and backward."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g) * 2 - 1) * scale

    ext = cpu_ext.load()
    if cell in ("lstm", "gru"):
        G = cells.get(cell).gates
        q, w_hh, b_hh = rand(T, B, G * H), rand(G * H, H, scale=H ** -0.5), rand(G * H)
        h0, c0 = rand(B, H), rand(B, H) if cell == "lstm" else None
        x, w_ih = rand(B, T, I), rand(G * H, I, scale=I ** -0.5)
        out, cs, saved = ext.gated_fwd(q, w_hh, b_hh, h0, c0, None, cell, True)
        grad_out = rand(T, B, H)
        step = 2 * B * H * G * H
        yield "forward", lambda: ext.gated_fwd(q, w_hh, b_hh, h0, c0, None, cell, True), T * step
        yield "inference", (lambda: ext.gated_fwd(x, w_hh, b_hh, h0, c0, None, cell, False, w_ih, b_hh)), \
            T * step + 2 * T * B * I * G * H
        yield "backward", (lambda: ext.gated_bwd(grad_out, None, out, cs, saved, w_hh, True, h0, c0, None, cell)), \
            2 * T * step
    elif cell == "course":  # token ids through the [V, H] table of relu(W_in e(v) + b_in)
        V = 85  # the course's vocabulary
        proj, ids = rand(V, H), torch.randint(0, V, (B, T), generator=g)
        w_h, b_h, h0 = rand(H, H, scale=H ** -0.5), rand(H, scale=0.1), rand(B, H)
        states = ext.rnn_fwd(proj, ids, w_h, b_h, h0, cell)
        grad_out, grad_h_n = rand(T, B, H).transpose(0, 1), torch.zeros(B, H)
        step = 2 * B * H * H
        yield "forward", lambda: ext.rnn_fwd(proj, ids, w_h, b_h, h0, cell), T * step
        yield "backward", (lambda: ext.rnn_bwd(grad_out, grad_h_n, states, h0, proj, ids, w_h, True, cell)), \
            2 * T * step
    else:  # the Elman cell: q time-major [T, B, H]
        q, w_h, h0 = rand(T, B, H), rand(H, H, scale=H ** -0.5), rand(B, H)
        x, w_ih, b = rand(B, T, I), rand(H, I, scale=I ** -0.5), rand(H)
        states = ext.rnn_fwd(q, None, w_h, None, h0, cell)
        grad_out, grad_h_n = rand(T, B, H).transpose(0, 1), torch.zeros(B, H)  # the states as [B, T, H]
        step = 2 * B * H * H
        yield "forward", lambda: ext.rnn_fwd(q, None, w_h, None, h0, cell), T * step
        yield "forward, x inside", (lambda: ext.rnn_fwd(x, None, w_h, b, h0, cell, w_ih)), T * step + 2 * T * B * I * H
        yield "backward", (lambda: ext.rnn_bwd(grad_out, grad_h_n, states, h0, q, None, w_h, False, cell)), 2 * T * step


def measure(call, flops: int, threads: int, rounds: int, probe):
    """Median wall seconds, products' share of the wall time, products' GFLOP/s, and their share
    of the FMA peak (each round's rate over the peak ``probe`` measured just before it)."""
    ext = cpu_ext.load()
    call()  # warm: buffers cached, weights' pages touched
    walls, shares, rates, of_peak = [], [], [], []
    for _ in range(rounds):
        peak = probe()
        ext.time_products(True)
        t0, w0 = ext.ticks_now(), time.perf_counter()
        call()
        t1, w1 = ext.ticks_now(), time.perf_counter()
        ticks = ext.time_products(False)
        product_s = ticks / ((t1 - t0) / (w1 - w0)) / threads
        walls.append(w1 - w0)
        shares.append(product_s / (w1 - w0))
        rates.append(flops / product_s / 1e9)
        of_peak.append(rates[-1] / peak)
    return statistics.median(walls), statistics.median(shares), statistics.median(rates), statistics.median(of_peak)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cells", default="lstm,gru,elman_tanh")
    args = ap.parse_args(argv)
    ext = cpu_ext.load()
    if not ext.panel_products_here():
        raise SystemExit("product_rate: the panel products do not run on this CPU (they need AVX-512)")
    torch.set_num_threads(args.threads)
    probe = peak_probe(args.threads)
    print(f"FMA peak on {args.threads} threads measured before every round; torch {torch.__version__}")
    print("| cell | B | T | I | H | pass | wall ms | products' share of it | products GF/s | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for cell in args.cells.split(","):
            for B, T, I, H in SHAPES:
                for name, call, flops in problems(cell, B, T, I, H):
                    wall, share, rate, of_peak = measure(call, flops, args.threads, args.rounds, probe)
                    print(f"| {cell} | {B} | {T} | {I if cell in ('lstm', 'gru') else ''} | {H} | {name} | "
                          f"{wall * 1e3:.2f} | {share:.0%} | {rate:.0f} | {of_peak:.0%} |", flush=True)


if __name__ == "__main__":
    main()
