"""Times the recurrence (input projection included) against the peers a user would run instead,
for each cell (``--cell``).

    python benchmarks/bench_rnn.py --shapes cpu --providers loop,nnrnn,compiled,fused,gemm
    python benchmarks/bench_rnn.py --cell elman --shapes cpu --providers loop,nnrnn,compiled,fused,gemm
    python benchmarks/bench_rnn.py --cell lstm --shapes cpu --providers loop,nnrnn,compiled,fused,gemm
    python benchmarks/bench_rnn.py --cell gru --shapes cpu --providers loop,nnrnn,compiled,fused,gemm

``--shapes tiny`` (any cell) is a smoke test of the script: two small shapes, one of each compile path.

``--cell course`` (the default): every provider computes the same function,
``(output [B, T, H], h_n [B, H])`` from token ids (shapes ``B,T,H``):

* ``loop``: the course's CharLoopModel loop as written (embedding and ``l_in`` inside the step
  loop), returning every state. The baseline a user of the course has.
* ``reference``: ``fused_rnn.rnn_reference`` (projection hoisted out of the loop). The ground
  truth of the tests; its ``r[:, t]`` slices make autograd write a zero ``[B, T, H]`` tensor per
  step in the backward, so it is a misleading speed baseline: shown, never the "strongest".
* ``nnrnn``: ``torch.nn.RNN`` with ``weight_ih = weight_hh = W_h`` fed ``relu(l_in(e(x)))``: cuDNN
  on CUDA, ATen's RNN on the CPU.
* ``compiled``: ``torch.compile`` of ``loop``. For T > 64 the whole unrolled loop takes many
  minutes to compile on a small CPU, so there it compiles one step (the cell) and loops in Python.
* ``fused``: ``fused_rnn`` with ``backend="auto"``; ``fused-blocked`` / ``fused-persistent``
  force a Triton kernel through ``FUSED_RNN_TRITON_KERNEL`` (CUDA).
* ``gemm``: only the matrix products the fused path must do (forward: one ``[B, H] x [H, H]`` per
  step; backward: one more per step and the ``[H, B*T] x [B*T, H]`` weight gradient): the floor.

``--cell elman`` / ``lstm`` / ``gru``: torch's own cells on dense input ``x [B, T, I]`` (shapes
``B,T,I,H``): ``torch.nn.RNN``'s (tanh), ``nn.LSTM``'s (G = 4 gates) and ``nn.GRU``'s (G = 3; for
the Elman cell G = 1), gradients with respect to ``x`` and every weight and bias
(``DENSE_CELLS`` says what differs: the parameters' G, the step's pointwise maths, the module, the
fused function):

* ``nnrnn``: torch's module itself, batch first (ATen on the CPU, oneDNN for the LSTM; cuDNN on CUDA).
* ``loop``: the loop a careful user writes: ``q = x W_ih^T + b_ih (+ b_hh)`` projected once for all
  steps (one ``F.linear``), then per step over ``q.unbind(1)`` (no per-step slicing) one
  ``addmm`` with ``W_hh^T`` (the GRU: ``b_hh`` added there, as its ``b_hn`` sits inside the reset
  gate) and the cell's pointwise maths in torch ops; autograd for the backward.
* ``compiled``: ``torch.compile`` of ``loop`` (of one step for T > 64, as above).
* ``fused``: ``fused_rnn.elman_rnn`` / ``lstm`` / ``gru``; ``fused-blocked`` / ``fused-persistent``
  as above.
* ``gemm``: the input projection ``[B*T, I] x [I, G*H]`` and one ``[B, H] x [H, G*H]`` per step
  (forward); backward adds one ``[B, G*H] x [G*H, H]`` per step, the ``[G*H, B*T] x [B*T, H]`` and
  ``[G*H, B*T] x [B*T, I]`` weight gradients and ``dx = dz W_ih``.

Each provider's forward output is checked against the float64 reference (``rnn_reference``,
``elman_reference``, ``lstm_reference``, ``gru_reference``): the max relative error is printed
beside its times and the table's last column gives the largest.

``--peak`` (CPU) measures the machine's fp32 FMA peak (``benchmarks/fma_peak.py``, ~0.1 s) at the
start of every round and the table gives each provider's product rate (the fused path's product
FLOPs over its time) as a share of it: the median over rounds of each round's rate over that
round's peak, so that the VM's drift cancels (the floor that ``torch.mm`` reaches only part of).

Medians: ``triton.testing.do_bench`` on CUDA; on the CPU, interleaved rounds (A, B, C, A, B, C,
...) in one process so machine drift hits all providers alike. Rows are appended to a CSV (with
the device name, versions and date); a markdown table is printed last, with fused's speedup over
the strongest other provider and the GEMM floor's share of fused's time; a PNG plot of the
speedups is drawn when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fused_rnn
from fused_rnn import elman_reference, rnn_reference
from fused_rnn.reference import gru_reference, lstm_reference

V, E = 85, 42  # the course's vocabulary and embedding size
SHAPE_SETS = {
    # design notes, section 3: the shapes with measured peer timings on an H200
    "design": [(512, 8, 256), (64, 512, 256), (256, 512, 256), (1024, 512, 256), (256, 512, 512)],
    "course": [(512, 8, 256)],
    "cpu": [(512, 8, 256), (64, 256, 256), (256, 64, 512)],
    "grid": [(B, T, H) for B in (64, 256, 1024) for T in (8, 512) for H in (128, 256, 512, 1024)]
    + [(512, 8, 256)],
    "tiny": [(16, 5, 32), (8, 70, 32)],  # a smoke test: both compile paths (T <= 64 and T > 64)
}
DENSE_SHAPE_SETS = {  # (B, T, I, H): --cell elman, lstm and gru
    "cpu": [(512, 8, 64, 256), (64, 256, 128, 256), (256, 64, 256, 512)],
    "tiny": [(16, 5, 24, 32), (8, 70, 24, 32)],
    "design": [(512, 8, 64, 256), (64, 512, 256, 256), (256, 512, 256, 256), (1024, 512, 256, 256),
               (256, 512, 512, 512)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HERE = os.path.dirname(os.path.abspath(__file__))
CSV_FIELDS = ["date", "device", "torch", "triton", "provider", "mode", "dtype", "B", "T", "H", "ms", "peak_mb",
              "cell", "I"]
PEERS = ("loop", "nnrnn", "compiled")  # what "strongest" is taken over (reference is not a fair peer)
COMPILE_WHOLE_LOOP_MAX_T = 64


def make_params(H, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        t = (torch.rand(*shape, generator=g) * 2 - 1) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    return dict(embedding=rand(V, E, scale=1.0), w_in=rand(H, E, scale=E ** -0.5),
                b_in=rand(H, scale=0.1), w_h=rand(H, H, scale=H ** -0.5), b_h=rand(H, scale=0.1))


def course_cell(c, h, p):
    """One step of the course's CharLoopModel: ``tanh(l_hidden(h + relu(l_in(e(c)))))``."""
    inp = F.relu(F.linear(F.embedding(c, p["embedding"]), p["w_in"], p["b_in"]))
    return torch.tanh(F.linear(h + inp, p["w_h"], p["b_h"]))


def course_loop(x, p, cell=course_cell):
    """The course's loop over the steps, keeping every state."""
    h = p["w_h"].new_zeros(x.shape[0], p["w_h"].shape[0])
    states = []
    for t in range(x.shape[1]):
        h = cell(x[:, t], h, p)
        states.append(h)
    return torch.stack(states, dim=1), h


class TiedRNN(torch.nn.Module):
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


@contextlib.contextmanager
def triton_kernel(name):
    """FUSED_RNN_TRITON_KERNEL=name for the calls inside."""
    old = os.environ.get("FUSED_RNN_TRITON_KERNEL")
    os.environ["FUSED_RNN_TRITON_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FUSED_RNN_TRITON_KERNEL"]
        else:
            os.environ["FUSED_RNN_TRITON_KERNEL"] = old


def make_dense_params(G, I, H, dtype, device, seed=0):
    """``w_ih [G*H, I]``, ``w_hh [G*H, H]``, ``b_ih``/``b_hh [G*H]``, torch's init
    ``U(-1/sqrt(H), 1/sqrt(H))`` (for G = 1 the numbers the elman cell always had)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = (torch.rand(*shape, generator=g) * 2 - 1) * H ** -0.5
        return t.to(device=device, dtype=dtype).requires_grad_()

    return dict(w_ih=rand(G * H, I), w_hh=rand(G * H, H), b_ih=rand(G * H), b_hh=rand(G * H))


# The careful user's steps: (q_t, state, w_hh, b_hh) -> state, state[0] = h_t. One addmm with
# W_hh^T per step, the cell's pointwise maths in torch ops.
def elman_step(q_t, state, w_hh, b_hh):
    return (torch.tanh(torch.addmm(q_t, state[0], w_hh.t())),)


def lstm_step(q_t, state, w_hh, b_hh):
    h, c = state
    i, f, g, o = torch.addmm(q_t, h, w_hh.t()).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_step(q_t, state, w_hh, b_hh):
    (h,) = state
    qr, qz, qn = q_t.chunk(3, dim=1)
    ar, az, an = torch.addmm(b_hh, h, w_hh.t()).chunk(3, dim=1)  # b_hn stays inside the reset gate
    r, z = torch.sigmoid(qr + ar), torch.sigmoid(qz + az)
    n = torch.tanh(qn + r * an)
    return (n + z * (h - n),)  # (1 - z) n + z h


@dataclasses.dataclass(frozen=True)
class DenseCell:
    """What differs between torch's cells on dense input ``x [B, T, I]``; one loop, one set of
    providers and one GEMM floor serve them all."""

    gates: int  # G: w_ih [G*H, I], w_hh [G*H, H]
    module: type  # torch's own: nn.RNN, nn.LSTM, nn.GRU
    step: Callable  # the loop's step, above
    fused: Callable  # fused_rnn's function (x, w_ih, w_hh, b_ih, b_hh) -> (output, h_n or (h_n, c_n))
    reference: Callable  # fused_rnn.reference's ground truth, the same signature
    states: int = 1  # 1: h; 2: h and c (the LSTM)
    fold_b_hh: bool = True  # b_hh folds into the projection q (not the GRU's: it enters with the product)


DENSE_CELLS = {
    "elman": DenseCell(1, torch.nn.RNN, elman_step, fused_rnn.elman_rnn, elman_reference),
    "lstm": DenseCell(4, torch.nn.LSTM, lstm_step, fused_rnn.lstm, lstm_reference, states=2),
    "gru": DenseCell(3, torch.nn.GRU, gru_step, fused_rnn.gru, gru_reference, fold_b_hh=False),
}
GATES = {"course": 1, **{name: c.gates for name, c in DENSE_CELLS.items()}}
PARAM_ORDER = ("w_ih", "w_hh", "b_ih", "b_hh")


def _h(state):
    """h_n of a second return value that is h_n or (h_n, c_n)."""
    return state[0] if isinstance(state, tuple) else state


def compiled_loop(loop, cell, params, T):
    """torch.compile of ``loop``: the whole unrolled loop up to COMPILE_WHOLE_LOOP_MAX_T steps,
    else only its ``cell`` (compiling a long unrolled loop takes many minutes on a small CPU)."""
    if T <= COMPILE_WHOLE_LOOP_MAX_T:
        return torch.compile(lambda x: loop(x, params))
    compiled_cell = torch.compile(cell)
    return lambda x: loop(x, params, compiled_cell)


def dense_loop(cell: DenseCell, x, p, step=None):
    """The careful user's loop: the input projected once (one F.linear over all steps), then per
    step the cell's ``step`` (one addmm and the pointwise maths) over ``q.unbind(1)``."""
    step = step or cell.step
    q = F.linear(x, p["w_ih"], p["b_ih"] + p["b_hh"] if cell.fold_b_hh else p["b_ih"])
    state = (q.new_zeros(x.shape[0], p["w_hh"].shape[1]),) * cell.states
    states = []
    for q_t in q.unbind(1):
        state = step(q_t, state, p["w_hh"], p["b_hh"])
        states.append(state[0])
    return torch.stack(states, dim=1), state[0]


class TorchRNN(torch.nn.Module):
    """torch's own module (nn.RNN, nn.LSTM, nn.GRU: ``cell.module``) holding the benchmark's parameters."""

    def __init__(self, cell: DenseCell, params):
        super().__init__()
        I, H = params["w_ih"].shape[1], params["w_hh"].shape[1]
        w = params["w_ih"]
        self.rnn = cell.module(I, H, batch_first=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for name, key in (("weight_ih_l0", "w_ih"), ("weight_hh_l0", "w_hh"), ("bias_ih_l0", "b_ih"),
                              ("bias_hh_l0", "b_hh")):
                getattr(self.rnn, name).copy_(params[key])

    def forward(self, x):
        output, h_n = self.rnn(x)
        return output, _h(h_n)[0]


def make_dense_providers(cell_name, names, params, x):
    """As make_providers, for torch's own cells (``DENSE_CELLS``); the gradient is also taken w.r.t. x."""
    cell = DENSE_CELLS[cell_name]
    device, T = x.device, x.shape[1]
    weights = [x] + list(params.values())
    loop = functools.partial(dense_loop, cell)

    def fused(x):
        output, h_n = cell.fused(x, *(params[k] for k in PARAM_ORDER))
        return output, _h(h_n)

    out = {}
    for name in names:
        if name == "loop":
            out[name] = (lambda x: loop(x, params), weights)
        elif name == "compiled":
            out[name] = (compiled_loop(loop, cell.step, params, T), weights)
        elif name == "nnrnn":
            peer = TorchRNN(cell, params)
            out[name] = (peer, [x] + list(peer.parameters()))
        elif name == "fused":
            out[name] = (fused, weights)
        elif name in ("fused-blocked", "fused-persistent"):
            if device.type != "cuda":
                continue  # FUSED_RNN_TRITON_KERNEL picks a Triton family: CUDA only
            out[name] = (forced(name.split("-")[1], fused), weights)
        elif name == "gemm":
            continue
        else:
            raise SystemExit(f"unknown provider {name!r} for --cell {cell_name}")
    return out


def reference_output(cell_name, params, x):
    """The float64 ground truth's output ``[B, T, H]`` (every provider is checked against it)."""
    p = {k: v.detach().double() for k, v in params.items()}
    with torch.no_grad():
        if cell_name == "course":
            return rnn_reference(x, p["w_in"], p["b_in"], p["w_h"], p["b_h"], embedding=p["embedding"])[0]
        return DENSE_CELLS[cell_name].reference(x.detach().double(), *(p[k] for k in PARAM_ORDER))[0]


def forced(kernel, fn):
    """``fn`` on one Triton kernel family (FUSED_RNN_TRITON_KERNEL=kernel while it runs), and
    `make_step` holds the variable over the backward too: autograd runs the backward after ``fn``
    returns, and until 2026-12-04 every fwd+bwd time of a forced family had its backward on the
    default family (then the blocked kernels)."""
    def run(x):
        with triton_kernel(kernel):
            return fn(x)
    run.triton_kernel = kernel
    return run


def make_providers(names, params, x):
    """{name: (fn, weights, gemm_only)}: fn(x) -> (output, h_n); the gradient is taken w.r.t. weights."""
    device, T = x.device, x.shape[1]
    weights = list(params.values())

    def fused(x):
        return fused_rnn.fused_rnn(x, params["w_in"], params["b_in"], params["w_h"], params["b_h"],
                                   embedding=params["embedding"])

    out = {}
    for name in names:
        if name == "loop":
            out[name] = (lambda x: course_loop(x, params), weights)
        elif name == "reference":
            out[name] = (lambda x: rnn_reference(x, params["w_in"], params["b_in"], params["w_h"],
                                                 params["b_h"], embedding=params["embedding"]), weights)
        elif name == "compiled":
            out[name] = (compiled_loop(course_loop, course_cell, params, T), weights)
        elif name == "nnrnn":
            peer = TiedRNN(params)
            out[name] = (peer, list(peer.parameters()))
        elif name == "fused":
            out[name] = (fused, weights)
        elif name in ("fused-blocked", "fused-persistent"):
            if device.type != "cuda":
                continue
            out[name] = (forced(name.split("-")[1], fused), weights)
        elif name == "gemm":
            continue  # timed separately: it is a different step
        else:
            raise SystemExit(f"unknown provider {name!r}")
    return out


def make_step(fn, weights, x, mode):
    """A no-argument callable running one forward (no grad) or forward + backward, both on the
    kernel family ``fn`` was `forced` to, if any."""
    kernel = getattr(fn, "triton_kernel", None)

    def scope():
        return triton_kernel(kernel) if kernel is not None else contextlib.nullcontext()

    if mode == "fwd":
        def step():
            with torch.no_grad(), scope():
                return fn(x)
        return step
    grads = None

    def step():
        nonlocal grads
        with scope():
            output, h_n = fn(x)
            if grads is None:
                grads = (torch.randn_like(output), torch.randn_like(h_n))
            return torch.autograd.grad((output, h_n), weights, grads)
    return step


def make_gemm_step(B, T, H, dtype, device, mode, I=0, G=1):
    """Only the matrix products of the fused path, in its shapes: the floor it is measured against.
    Per step ``[B, H] x [H, G*H]`` (forward) and ``[B, G*H] x [G*H, H]`` (backward); ``I`` > 0: also
    the dense input's projection ``[B*T, I] x [I, G*H]`` (forward), ``dx`` and ``dW_ih`` (backward);
    the backward's ``dW_hh = dz^T h`` over all B*T rows. ``G`` gates (1: the course's and elman's
    cells, 4: the LSTM, 3: the GRU)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(B, H, generator=g).to(device, dtype)
    w = torch.randn(H, G * H, generator=g).to(device, dtype)  # W_hh^T
    out = torch.empty(B, G * H, device=device, dtype=dtype)
    dz = torch.randn(B * T, G * H, generator=g).to(device, dtype) if mode != "fwd" else None
    x = torch.randn(B * T, I, generator=g).to(device, dtype) if I else None
    w_ih = torch.randn(G * H, I, generator=g).to(device, dtype) if I else None
    if G == 1:  # the shapes of both directions agree: the backward reuses the forward's operands
        back, hs = (a, w, out), dz
    else:
        back = (torch.randn(B, G * H, generator=g).to(device, dtype), w.t(),
                torch.empty(B, H, device=device, dtype=dtype))
        hs = torch.randn(B * T, H, generator=g).to(device, dtype) if dz is not None else None

    def step():
        if x is not None:
            x @ w_ih.t()
        for _ in range(T):
            torch.mm(a, w, out=out)
        if dz is None:
            return out
        grad, weight, grad_out = back
        for _ in range(T):
            torch.mm(grad, weight, out=grad_out)
        if x is not None:
            dz @ w_ih, dz.t() @ x
        return dz.t() @ hs
    return step


def product_flops(B, T, H, I, mode, G=1) -> int:
    """The FLOPs of ``make_gemm_step``'s products: what the fused path must multiply."""
    step = 2 * B * H * G * H  # one [B, H] x [H, G*H] product
    flops = T * step + 2 * B * T * I * G * H  # the recurrence and the dense input's projection
    if mode != "fwd":
        flops += T * step + 2 * B * T * G * H * H + 2 * (2 * B * T * G * H * I)  # chain, dW_hh, dx and dW_ih
    return flops


def median_ms(steps: dict, device, rounds=15, budget_s=60) -> dict:
    if device.type == "cuda":
        import triton.testing
        return {k: triton.testing.do_bench(s, warmup=25, rep=200, return_mode="median")
                for k, s in steps.items()}
    times, _ = interleaved_ms(steps, rounds, budget_s)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_ms(steps: dict, rounds=15, budget_s=60, probe=None):
    """CPU: each step's time (ms) per round, the steps interleaved (A, B, C, A, B, C, ...); with
    ``probe`` (``fma_peak.peak_probe``) also the FMA peak (GFLOP/s) measured at each round's start."""
    for s in steps.values():  # warm up (compiles, allocator)
        s()
    times, peaks = {k: [] for k in steps}, []
    deadline = time.perf_counter() + budget_s
    for _ in range(rounds):
        if probe is not None:
            peaks.append(probe())
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline:
            break
    return times, peaks


def peak_shares(times: dict, peaks: list, flops: int) -> dict:
    """Each step's product rate as a share of the FMA peak: the median over rounds of the round's
    rate over the peak measured in that round."""
    return {k: statistics.median(flops / (ms * 1e6) / peak for ms, peak in zip(v, peaks))
            for k, v in times.items()}


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
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} x{torch.get_num_threads()} threads"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", default="course", choices=["course", *DENSE_CELLS],
                    help="course: the course's cell on token ids; elman, lstm, gru: torch.nn.RNN's own "
                         "(tanh), nn.LSTM's, nn.GRU's on dense input")
    ap.add_argument("--shapes", default="design",
                    help=f"course: one of {list(SHAPE_SETS)} or B,T,H[;B,T,H...]; "
                         f"elman, lstm, gru: one of {list(DENSE_SHAPE_SETS)} or B,T,I,H[;...]")
    ap.add_argument("--providers", default="loop,nnrnn,fused,gemm",
                    help="comma-separated: loop, reference, nnrnn, compiled, fused, fused-blocked, "
                         "fused-persistent, gemm")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--dtypes", default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=15, help="CPU: interleaved rounds per shape and mode")
    ap.add_argument("--csv", default=os.path.join(HERE, "results.csv"), help="CSV to append rows to")
    ap.add_argument("--no-csv", action="store_true", help="do not write a CSV")
    ap.add_argument("--peak", action="store_true",
                    help="CPU: measure this machine's fp32 FMA peak first (benchmarks/fma_peak.py) and "
                         "give each provider's product rate as a share of it")
    ap.add_argument("--plot", default=os.path.join(HERE, "speedup.png"),
                    help="PNG of fused's speedup over the strongest peer per shape ('' for none)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dense = args.cell in DENSE_CELLS
    shapes = (DENSE_SHAPE_SETS if dense else SHAPE_SETS).get(args.shapes) \
        or [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if any(len(s) != (4 if dense else 3) for s in shapes):
        raise SystemExit(f"--shapes: expected {'B,T,I,H' if dense else 'B,T,H'} per shape, got {args.shapes!r}")
    names = args.providers.split(",")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    meta = dict(date=datetime.date.today().isoformat(), device=device_name(device), torch=torch.__version__,
                triton=triton_version)
    print(f"# {meta['device']}, torch {torch.__version__}, triton {triton_version}, {meta['date']}")
    probe, peaks = None, []
    if args.peak and device.type == "cpu":
        from fma_peak import peak_probe
        probe = peak_probe(torch.get_num_threads())

    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for shape in shapes:
            if dense:
                B, T, I, H = shape
                params = make_dense_params(GATES[args.cell], I, H, dtype, device)
                x = torch.randn(B, T, I, generator=torch.Generator().manual_seed(2)).to(device, dtype)
                x.requires_grad_()
                providers = make_dense_providers(args.cell, names, params, x)
            else:
                (B, T, H), I = shape, 0
                params = make_params(H, dtype, device)
                x = torch.randint(0, V, (B, T), device=device)
                providers = make_providers(names, params, x)
            # Every provider must compute the same function: its forward against the float64 reference.
            want = reference_output(args.cell, params, x)
            errs = {k: max_rel_err(fn(x)[0].detach(), want) for k, (fn, _) in providers.items()}
            for mode in args.modes.split(","):
                steps = {k: make_step(fn, w, x, mode) for k, (fn, w) in providers.items()}
                if "gemm" in names:
                    steps["gemm"] = make_gemm_step(B, T, H, dtype, device, mode, I, GATES[args.cell])
                shares = {}
                if probe is not None:
                    times, round_peaks = interleaved_ms(steps, rounds=args.rounds, probe=probe)
                    ms = {k: statistics.median(v) for k, v in times.items()}
                    shares = peak_shares(times, round_peaks, product_flops(B, T, H, I, mode, GATES[args.cell]))
                    peaks += round_peaks
                else:
                    ms = median_ms(steps, device, rounds=args.rounds)
                for k in steps:
                    rows.append(dict(meta, provider=k, mode=mode, dtype=dtype_name, B=B, T=T, H=H,
                                     ms=round(ms[k], 4), peak_mb=round(peak_mb(steps[k], device), 1),
                                     cell=args.cell, I=I or "", max_rel_err=errs.get(k),
                                     peak_share=shares.get(k)))
                    err = f"  (fwd max rel err vs fp64 reference: {errs[k]:.1e})" if k in errs else ""
                    print(f"{args.cell} {dtype_name} B={B} T={T}{f' I={I}' if I else ''} H={H} {mode:8s} "
                          f"{k:16s} {ms[k]:9.3f} ms{err}", flush=True)
            del providers, steps, want
    if args.csv and not args.no_csv:
        append_csv(args.csv, rows)
    if peaks:
        print(f"# fp32 FMA peak on {torch.get_num_threads()} threads, measured at each round's start: "
              f"median {statistics.median(peaks):.0f} GFLOP/s (range {min(peaks):.0f}-{max(peaks):.0f})")
    print_table(rows, with_shares=bool(peaks))
    if args.plot:
        plot_speedups(rows, args.plot, f"{meta['device']}, torch {torch.__version__}, triton {triton_version}")


def append_csv(path, rows):
    """Appends rows; a file written before the cell and I columns existed is rewritten with them
    (its rows are the course cell's)."""
    old = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CSV_FIELDS:
                old = [dict(r, cell=r.get("cell") or "course", I=r.get("I") or "") for r in reader]
        if not old:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore").writerows(rows)
            return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(old + rows)


def _key(r):
    return (r.get("cell", "course"), r["dtype"], r["B"], r["T"], r.get("I", ""), r["H"], r["mode"])


def summarize(rows):
    """[(key, {provider: ms}, strongest peer, fused speedup over it, GEMM share of fused)] per
    (cell, dtype, B, T, I, H, mode); the fused provider is the fastest of fused* present."""
    keys = list(dict.fromkeys(_key(r) for r in rows))
    out = []
    for key in keys:
        ms = {r["provider"]: r["ms"] for r in rows if _key(r) == key}
        fused = min((v for k, v in ms.items() if k.startswith("fused")), default=None)
        peers = {k: v for k, v in ms.items() if k in PEERS}
        best = min(peers, key=peers.get) if peers else None
        speedup = peers[best] / fused if best and fused else None
        share = ms["gemm"] / fused if "gemm" in ms and fused else None
        out.append((key, ms, best, speedup, share))
    return out


def plot_speedups(rows, path, title):
    """One bar per (shape, mode, dtype): time of the strongest peer / time of fused."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib)")
        return
    bars = [(key, best, s) for key, _, best, s, _ in summarize(rows) if s is not None]
    if not bars:
        return
    labels = [f"{c} {d} B{B} T{T}{f' I{I}' if I else ''} H{H}\n{m} vs {best}"
              for (c, d, B, T, I, H, m), best, _ in bars]
    speedups = [s for _, _, s in bars]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4))
    ax.bar(range(len(bars)), speedups, color=["tab:green" if v >= 1 else "tab:red" for v in speedups])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(bars)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup of fused over the strongest peer (x)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def print_table(rows, with_shares=False):
    """The markdown table: each provider's time and product rate (the fused path's product FLOPs
    over its time), ``with_shares`` its share of the FMA peak (``peak_shares``). The last column:
    the largest forward error against the float64 reference over the providers, and whose."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    rate = " (GF/s" + (", % of peak)" if with_shares else ")")
    print("\n| cell | dtype | B | T | I | H | mode | " + " | ".join(f"{p} ms{rate}" for p in providers)
          + " | fused vs strongest peer | GEMM floor share of fused | max rel err vs fp64 |")
    print("|---" * (10 + len(providers)) + "|")
    for key, ms, best, speedup, share in summarize(rows):
        cell_name, _, B, T, I, H, mode = key
        flops = product_flops(B, T, H, I or 0, mode, GATES.get(cell_name, 1))
        errs = {r["provider"]: r["max_rel_err"] for r in rows
                if _key(r) == key and r.get("max_rel_err") is not None}
        shares = {r["provider"]: r.get("peak_share") for r in rows if _key(r) == key}
        worst = max(errs, key=errs.get) if errs else None

        def cell(p):
            if p not in ms:
                return "-"
            gflops = flops / (ms[p] * 1e6)
            share = shares.get(p)
            return f"{ms[p]:.3f} ({gflops:.0f}" + (f", {share:.0%})" if share is not None else ")")
        print("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cell(p) for p in providers)
              + f" | {f'{speedup:.2f}x ({best})' if speedup else '-'} | {f'{share:.0%}' if share else '-'} | "
              + (f"{errs[worst]:.1e} ({worst})" if worst else "-") + " |")


if __name__ == "__main__":
    main()
