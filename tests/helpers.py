"""Random problems and comparisons shared by the tests."""
from __future__ import annotations

import torch

from fused_rnn import fused_rnn, rnn_reference

# Relative error (max |got - want| / max |want|) allowed per dtype, against an fp64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def make_problem(B, T, H, *, E=6, V=11, tokens=True, h0=True, bias=True, dtype=torch.float32,
                 device="cpu", seed=0):
    """Random inputs for fused_rnn as a dict of keyword arguments (float ones require grad).

    Weights are scaled like nn.Linear's init so states stay away from tanh's flat tails.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
        return t.to(device=device, dtype=dtype).requires_grad_()

    args = dict(
        w_in=rand(H, E, scale=E ** -0.5),
        b_in=rand(H, scale=0.5) if bias else None,
        w_h=rand(H, H, scale=1.5 * H ** -0.5),
        b_h=rand(H, scale=0.5) if bias else None,
        h0=rand(B, H, scale=0.9) if h0 else None,
    )
    if tokens:
        args["x"] = torch.randint(0, V, (B, T), generator=g).to(device)
        args["embedding"] = rand(V, E)
    else:
        args["x"] = rand(B, T, E)
    return args


def float_inputs(args):
    return {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def cast(args, dtype):
    """A detached copy of the problem with float inputs in ``dtype``."""
    return {k: (v.detach().to(dtype).requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                else v) for k, v in args.items()}


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def run_with_grads(fn, args, seed=1):
    """Runs fn(**args), backpropagates random output grads; returns {name: tensor} of the outputs
    and every float input's gradient."""
    output, h_n = fn(**args)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(output.shape, generator=g, dtype=torch.float64).to(output)
    gh = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(h_n)
    inputs = float_inputs(args)
    grads = torch.autograd.grad((output * go).sum() + (h_n * gh).sum(), list(inputs.values()))
    return {"output": output, "h_n": h_n, **{f"grad_{k}": v for k, v in zip(inputs, grads)}}


def check_parity(args, dtype, backend, function=fused_rnn, reference=rnn_reference):
    """``function``'s outputs and every gradient on ``backend`` against its float64 reference
    loop, within ``TOLERANCE[dtype]`` (the course's cell by default)."""
    got = run_with_grads(lambda **a: function(**a, backend=backend), args)
    want = run_with_grads(reference, cast(args, torch.float64))
    # In bf16/fp16 some inputs leave a gradient far less exact than its tolerance in the
    # reference loop itself (bf16, dense input at H=300: grad_w_in 6e-2 to 1.2e-1 eager, the
    # kernels the same): there the bar is twice the loop's own error in that dtype.
    eager = run_with_grads(reference, args) if dtype in (torch.bfloat16, torch.float16) else None
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == dtype, name
        err = rel_err(got[name], want[name])
        bar = TOLERANCE[dtype] if eager is None else max(TOLERANCE[dtype], 2 * rel_err(eager[name], want[name]))
        assert err < bar, f"{name}: relative error {err:.2e} (bar {bar:.1e})"


def count_persistent_launches(monkeypatch, gated=False) -> dict:
    """Counts the persistent kernels' launches from here on (the one-gate cells', or with ``gated``
    the LSTM's and GRU's): ``{"fwd": n, "bwd": n}``."""
    from fused_rnn.ops import triton_gated_persistent, triton_persistent

    module, prefix = (triton_gated_persistent, "gated_persistent_") if gated else (triton_persistent, "persistent_")
    calls = {"fwd": 0, "bwd": 0}
    for key in calls:
        original = getattr(module, prefix + key)

        def spy(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, prefix + key, spy)
    return calls


def gated_problem(cell, T, B, H, P=0, state="both", bias=True, dtype=torch.float64, seed=0, device="cpu"):
    """The LSTM's or GRU's kernel-interface inputs (``P`` the LSTM's projection, 0: none;
    ``state`` which of h0 / c0 are given: "both", "h0", "c0", "none"), float64 values that
    ``dtype`` holds exactly."""
    from fused_rnn import cells

    g = torch.Generator().manual_seed(seed)
    G, Pw = cell.gates, P or H

    def rand(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype).to(device)

    lstm = cell is cells.LSTM
    return dict(q=rand(T, B, G * H, scale=2.0), w_hh=rand(G * H, Pw, scale=1.5 * Pw ** -0.5),
                b_hh=rand(G * H, scale=0.5) if bias and cell.hidden_bias else None,
                h0=rand(B, Pw) if state in ("both", "h0") else None,
                c0=rand(B, H, scale=2.0) if lstm and state in ("both", "c0") else None,
                w_hr=rand(P, H, scale=H ** -0.5) if P else None)


GATED_NAMES = ("q", "w_hh", "b_hh", "h0", "c0", "w_hr")


def compare_gated(cell, args, grad_cs=True, tol=1e-12):
    """The Triton kernels' (`ops/triton_gated.py`) forward and backward against the reference
    loop's (`ops/loop.py`) on the same inputs (the loop in float64): every output, ``saved``
    included, and every gradient of a given input."""
    from fused_rnn import cells
    from fused_rnn.ops import loop, triton_gated

    dtype, device = args["w_hh"].dtype, args["q"].device
    wide = {k: None if v is None else v.double() for k, v in args.items()}
    got = triton_gated.gated_fwd(**args, allow_tf32=False, cell=cell.name)
    want = loop.gated_fwd(**wide, allow_tf32=False, cell=cell.name)
    for name, o, w in zip(("out", "cs", "saved"), got, want):
        assert o.shape == w.shape and o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert o.numel() == 0 or rel_err(o, w) < tol, (name, rel_err(o, w))
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(want[0].shape, generator=g, dtype=torch.float64).to(device)
    lstm = cell is cells.LSTM
    grad_c = torch.randn(want[1].shape, generator=g, dtype=torch.float64).to(device) if lstm and grad_cs else None
    w_grads = loop.gated_bwd(grad_out, grad_c, *want, **wide, allow_tf32=False, cell=cell.name)
    low = [None if t is None else t.to(got[0].dtype) for t in (grad_out, grad_c)]
    o_grads = triton_gated.gated_bwd(*low, *got, **args, allow_tf32=False, cell=cell.name)
    for name, o, w in zip(GATED_NAMES, o_grads, w_grads):
        if args[name] is None:
            assert o is None, name
        else:
            assert o.shape == args[name].shape and rel_err(o, w) < tol, (name, rel_err(o, w))


def assert_same(got, want, tol=1e-9):
    """Two ``{name: tensor or None}`` results of a twin and torch's module: the same names, the
    same non-float values, float ones of the same shape and dtype within ``tol`` (relative)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        if w is None or not w.is_floating_point():
            assert (g is None and w is None) or torch.equal(g, w), name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
        if w.numel():
            assert rel_err(g, w) < tol, f"{name}: relative error {rel_err(g, w):.1e}"


def rand(*shape, seed=0, device="cpu"):
    """Seeded float64 values that require grad, the same on every device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
