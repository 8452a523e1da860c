"""Times the recurrence (token input, projection included) across providers.

    python benchmarks/bench_rnn.py --shapes design --providers eager,cudnn,fused --modes fwd,fwd+bwd

Providers compute the same function: `eager` (the reference loop), `compiled` (torch.compile of
it), `cudnn` (nn.RNN with weight_ih = weight_hh = W_h, fed relu(l_in(e(x))); CUDA only) and
`fused` (fused_rnn's fastest backend for the device). Medians: triton.testing.do_bench on CUDA;
on CPU, interleaved rounds (provider A, B, C, A, B, C, ...) so machine noise hits all alike.
Appends rows to benchmarks/results.csv, prints a markdown table and draws the fused provider's
speedup over the reference provider (cudnn when timed, else eager) per shape into a PNG.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fused_rnn
from fused_rnn import rnn_reference

V, E = 85, 42  # the course's vocabulary and embedding size
SHAPE_SETS = {
    # design notes, section 3: the shapes with measured peer timings on an H200
    "design": [(512, 8, 256), (64, 512, 256), (256, 512, 256), (1024, 512, 256), (256, 512, 512)],
    "course": [(512, 8, 256)],
    "cpu": [(512, 8, 256), (64, 256, 256)],
    "grid": [(B, T, H) for B in (64, 256, 1024) for T in (8, 512) for H in (128, 256, 512, 1024)]
    + [(512, 8, 256)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CSV_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.csv")
CSV_FIELDS = ["date", "gpu", "torch", "triton", "provider", "mode", "dtype", "B", "T", "H", "ms", "peak_mb"]


def make_params(H, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        t = (torch.rand(*shape, generator=g) * 2 - 1) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    return dict(embedding=rand(V, E, scale=1.0), w_in=rand(H, E, scale=E ** -0.5),
                b_in=rand(H, scale=0.1), w_h=rand(H, H, scale=H ** -0.5), b_h=rand(H, scale=0.1))


class CudnnPeer(torch.nn.Module):
    """nn.RNN computing the same h_t: tanh(W_h r_t + W_h h_{t-1} + b_h) with r_t = relu(l_in(e(x)))."""

    def __init__(self, params):
        super().__init__()
        H = params["w_h"].shape[0]
        p = {k: v.detach() for k, v in params.items()}
        self.embedding = torch.nn.Parameter(p["embedding"].clone())
        self.w_in = torch.nn.Parameter(p["w_in"].clone())
        self.b_in = torch.nn.Parameter(p["b_in"].clone())
        self.rnn = torch.nn.RNN(H, H, nonlinearity="tanh", batch_first=True,
                                device=p["w_h"].device, dtype=p["w_h"].dtype)
        with torch.no_grad():
            self.rnn.weight_ih_l0.copy_(p["w_h"])
            self.rnn.weight_hh_l0.copy_(p["w_h"])
            self.rnn.bias_ih_l0.zero_()
            self.rnn.bias_hh_l0.copy_(p["b_h"])

    def forward(self, x):
        r = F.relu(F.linear(F.embedding(x, self.embedding), self.w_in, self.b_in))
        output, h_n = self.rnn(r)
        return output, h_n[0]


def make_providers(names, params, device):
    def reference(x):
        return rnn_reference(x, params["w_in"], params["b_in"], params["w_h"], params["b_h"],
                             embedding=params["embedding"])

    def fused(x):
        return fused_rnn.fused_rnn(x, params["w_in"], params["b_in"], params["w_h"], params["b_h"],
                                   embedding=params["embedding"])

    out = {}
    for name in names:
        if name == "eager":
            out[name] = (reference, list(params.values()))
        elif name == "compiled":
            out[name] = (torch.compile(reference), list(params.values()))
        elif name == "cudnn":
            if device.type != "cuda":
                continue
            peer = CudnnPeer(params)
            out[name] = (peer, list(peer.parameters()))
        elif name == "fused":
            out[name] = (fused, list(params.values()))
        else:
            raise SystemExit(f"unknown provider {name!r}")
    return out


def make_step(fn, weights, x, mode):
    """A no-argument callable running one forward (no grad) or forward + backward."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(x)
        return step
    grads = None

    def step():
        nonlocal grads
        output, h_n = fn(x)
        if grads is None:
            grads = (torch.randn_like(output), torch.randn_like(h_n))
        return torch.autograd.grad((output, h_n), weights, grads)
    return step


def median_ms(steps: dict, device, rounds=15) -> dict:
    if device.type == "cuda":
        import triton.testing
        return {k: triton.testing.do_bench(s, warmup=25, rep=200, return_mode="median")
                for k, s in steps.items()}
    for s in steps.values():  # warm up (compiles, allocator)
        s()
    times = {k: [] for k in steps}
    deadline = time.perf_counter() + 60
    for _ in range(rounds):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mb(step, device):
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def max_rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="design", help=f"one of {list(SHAPE_SETS)} or B,T,H[;B,T,H...]")
    ap.add_argument("--providers", default="eager,cudnn,fused")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-csv", action="store_true", help="do not append to results.csv")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(CSV_PATH), "speedup.png"),
                    help="PNG of fused's speedup per shape ('' for none)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = SHAPE_SETS.get(args.shapes) or [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    meta = dict(date=datetime.date.today().isoformat(), gpu=gpu, torch=torch.__version__, triton=triton_version)
    print(f"# {gpu}, torch {torch.__version__}, triton {triton_version}, {meta['date']}")

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for B, T, H in shapes:
            params = make_params(H, dtype, device)
            x = torch.randint(0, V, (B, T), device=device)
            providers = make_providers(args.providers.split(","), params, device)
            # The peers must compute the same function: check each forward against the first.
            outs = {k: fn(x)[0].detach() for k, (fn, _) in providers.items()}
            first = next(iter(outs.values()))
            errs = {k: max_rel_err(o, first) for k, o in outs.items()}
            for mode in args.modes.split(","):
                steps = {k: make_step(fn, w, x, mode) for k, (fn, w) in providers.items()}
                ms = median_ms(steps, device)
                for k in steps:
                    row = dict(meta, provider=k, mode=mode, dtype=dtype_name, B=B, T=T, H=H,
                               ms=round(ms[k], 4), peak_mb=round(peak_mb(steps[k], device), 1))
                    rows.append(row)
                    print(f"{dtype_name} B={B} T={T} H={H} {mode:8s} {k:9s} {ms[k]:9.3f} ms"
                          f"  (fwd rel err vs {next(iter(outs))}: {errs[k]:.1e})", flush=True)
            del providers, steps, outs
    if not args.no_csv:
        new = not os.path.exists(CSV_PATH)
        with open(CSV_PATH, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
    print_table(rows)
    if args.plot:
        plot_speedups(rows, args.plot, f"{gpu}, torch {torch.__version__}, triton {triton_version}")


def reference_provider(providers):
    return "cudnn" if "cudnn" in providers else providers[0]


def plot_speedups(rows, path, title):
    """One bar per (shape, mode, dtype): time of the reference provider / time of fused."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    ref = reference_provider(providers)
    if "fused" not in providers or ref == "fused":
        return
    ms = {(r["dtype"], r["B"], r["T"], r["H"], r["mode"], r["provider"]): r["ms"] for r in rows}
    keys = list(dict.fromkeys(k[:5] for k in ms))
    labels = [f"{d} B{B} T{T} H{H}\n{m}" for d, B, T, H, m in keys]
    speedups = [ms[k + (ref,)] / ms[k + ("fused",)] for k in keys]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys)), 4))
    ax.bar(range(len(keys)), speedups, color=["tab:green" if v >= 1 else "tab:red" for v in speedups])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"speedup of fused over {ref} (x)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def print_table(rows):
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    keys = list(dict.fromkeys((r["dtype"], r["B"], r["T"], r["H"], r["mode"]) for r in rows))
    ms = {(r["dtype"], r["B"], r["T"], r["H"], r["mode"], r["provider"]): r["ms"] for r in rows}
    ref = reference_provider(providers)
    print("\n| dtype | B | T | H | mode | " + " | ".join(f"{p} ms" for p in providers)
          + f" | fused speedup vs {ref} |")
    print("|---" * (6 + len(providers)) + "|")
    for key in keys:
        vals = [ms.get(key + (p,)) for p in providers]
        speed = ms.get(key + (ref,), float("nan")) / ms.get(key + ("fused",), float("nan"))
        print("| " + " | ".join(str(k) for k in key) + " | "
              + " | ".join(f"{v:.3f}" if v is not None else "-" for v in vals) + f" | {speed:.2f}x |")


if __name__ == "__main__":
    main()
