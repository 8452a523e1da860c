"""The LSTM and GRU functions ``fused_rnn.lstm`` / ``gru`` on every backend, against
``torch.nn.LSTM`` / ``nn.GRU`` themselves in float64 (outputs, final states, every gradient), in
float32 against the float64 reference, through gradcheck, and refusing bad input."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import cells
from fused_rnn.gated_op import gated_recurrence
from fused_rnn.ops import cpu_ext, loop
from conftest import backend_device, exhaustive, tiered
from helpers import TOLERANCE, rel_err

BACKENDS = ["reference", "cpu", "triton"]

# (B, T, I, H, P (LSTM projection, 0: none), h0, bias, lengths)
_CONFIGS = [
    (5, 7, 6, 19, 0, True, True, False),
    (3, 4, 5, 8, 5, False, False, False),
    (4, 6, 3, 10, 0, True, True, True),
    (1, 1, 2, 1, 0, False, True, False),
    (17, 3, 4, 33, 7, True, True, True),
    (2, 9, 1, 4, 3, True, False, True),
]
# (kind, config): the projection P is the LSTM's alone
_CASES = [(kind, c) for c in _CONFIGS for kind in ("lstm", "gru") if kind == "lstm" or not c[4]]
CASES = tiered(_CASES, fast=[case for case in _CASES if case[1] in _CONFIGS[:3]], several_names=True,
               ids=lambda case: "{}-B{}-T{}-I{}-H{}-P{}-{}-{}-{}".format(
                   case[0], *case[1][:5], "h0" if case[1][5] else "zeros", "bias" if case[1][6] else "no-bias",
                   "lengths" if case[1][7] else "full"))


def make_module(kind, I, H, P, bias, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    if kind == "lstm":
        return nn.LSTM(I, H, bias=bias, batch_first=True, proj_size=P, dtype=dtype)
    return nn.GRU(I, H, bias=bias, batch_first=True, dtype=dtype)


def weights(module, kind):
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"] + (["weight_hr_l0"] if kind == "lstm" else [])
    return [getattr(module, n, None) for n in names]


def call(kind, x, params, states, lengths, backend):
    """fused_rnn.lstm / gru -> (output, [h_n] or [h_n, c_n])."""
    w_ih, w_hh, b_ih, b_hh, *w_hr = params
    if kind == "lstm":
        out, (h_n, c_n) = fused_rnn.lstm(x, w_ih, w_hh, b_ih, b_hh, *states, w_hr[0], lengths=lengths, backend=backend)
        return out, [h_n, c_n]
    out, h_n = fused_rnn.gru(x, w_ih, w_hh, b_ih, b_hh, *states, lengths=lengths, backend=backend)
    return out, [h_n]


def torch_call(module, kind, x, states, lengths):
    """torch's module batch first (packed when ``lengths``), its states as ours: [B, ...]."""
    hx = None
    if states[0] is not None:
        hx = tuple(s.unsqueeze(0) for s in states) if kind == "lstm" else states[0].unsqueeze(0)
    if lengths is not None:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, finals = module(packed, hx)
        out = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
    else:
        out, finals = module(x, hx)
    finals = list(finals) if kind == "lstm" else [finals]
    return out, [f.squeeze(0) for f in finals]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,config", CASES)
def test_matches_torch_fp64(backend, kind, config):
    B, T, I, H, P, with_h0, bias, with_lengths = config
    device = backend_device(backend)
    module = make_module(kind, I, H, P, bias, seed=B * T + H).to(device)
    g = torch.Generator().manual_seed(H)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64).to(device).requires_grad_()
    states = [None] if kind == "gru" else [None, None]
    if with_h0:
        shapes = [(B, P or H), (B, H)] if kind == "lstm" else [(B, H)]
        states = [torch.randn(*s, generator=g, dtype=torch.float64).to(device).requires_grad_() for s in shapes]
    lengths = torch.randint(1, T + 1, (B,), generator=g) if with_lengths else None
    if lengths is not None:
        lengths[0] = T
    params = weights(module, kind)
    leaves = [x] + [t for t in params + states if t is not None]

    def outputs_and_grads(out, finals):
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
        loss = (out * go).sum() + sum((f * (k + 2)).sum() for k, f in enumerate(finals))
        return [out, *finals, *torch.autograd.grad(loss, leaves)]

    ours = outputs_and_grads(*call(kind, x, params, states, lengths, backend))
    want = outputs_and_grads(*torch_call(module, kind, x, states, lengths))
    for got, expected in zip(ours, want):
        assert rel_err(got, expected) < 1e-10


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cpu_fp32_within_rounding_of_fp64(kind):
    """The C++ kernels in float32 against the float64 reference: every result and gradient within
    fp32 rounding (TOLERANCE), at a size where the products sum hundreds of terms."""
    B, T, I, H, P = 16, 12, 24, 96, (32 if kind == "lstm" else 0)
    module = make_module(kind, I, H, P, True, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64)
    shapes = [(B, P or H), (B, H)] if kind == "lstm" else [(B, H)]
    states = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]

    def run(dtype, backend):
        leaves = [t.detach().to(dtype).requires_grad_() for t in [x] + weights(module, kind) + states if t is not None]
        it = iter(leaves[1:])
        params = [next(it) if t is not None else None for t in weights(module, kind)]
        out, finals = call(kind, leaves[0], params, leaves[-len(states):], None, backend)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad((out * go).sum() + sum(f.sum() for f in finals), leaves)
        return [out, *finals, *grads]

    for got, want in zip(run(torch.float32, "cpu"), run(torch.float64, "reference")):
        assert rel_err(got, want) < TOLERANCE[torch.float32]


def op_problem(cell, T, B, H, P, dtype, state, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(dtype)

    G = cell.gates
    return dict(q=rand(T, B, G * H), w_hh=rand(G * H, P or H, scale=(P or H) ** -0.5),
                b_hh=rand(G * H) if cell.hidden_bias else None, h0=rand(B, P or H) if state else None,
                c0=rand(B, H) if state and cell is cells.LSTM else None,
                w_hr=rand(P, H, scale=H ** -0.5) if P else None)


@pytest.mark.parametrize("cell,P", [(cells.LSTM, 0), (cells.LSTM, 3), (cells.GRU, 0)], ids=["lstm", "lstm-proj", "gru"])
@pytest.mark.parametrize("state", [True, False], ids=["state", "zeros"])
def test_cpu_kernels_match_the_loop_at_the_interface(cell, P, state):
    """The C++ gated_fwd / gated_bwd against the reference loop's, tensor by tensor (saved
    included), with odd sizes and a gradient at every c_t."""
    args = op_problem(cell, T=6, B=19, H=13, P=P, dtype=torch.float64, state=state)
    fwd = [loop.gated_fwd(**args, allow_tf32=False, cell=cell.name), cpu_ext.gated_fwd(**args, cell=cell.name)]
    for want, got in zip(*fwd):
        assert got.shape == want.shape and (got.numel() == 0 or rel_err(got, want) < 1e-12)
    g = torch.Generator().manual_seed(5)
    grad_out = torch.randn(fwd[0][0].shape, generator=g, dtype=torch.float64)
    grad_cs = torch.randn(fwd[0][1].shape, generator=g, dtype=torch.float64) if cell is cells.LSTM else None
    want = loop.gated_bwd(grad_out, grad_cs, *fwd[0], **args, allow_tf32=False, cell=cell.name)
    got = cpu_ext.gated_bwd(grad_out, grad_cs, *fwd[1], **args, cell=cell.name)
    names = ("q", "w_hh", "b_hh", "h0", "c0", "w_hr")
    for name, w, o in zip(names, want, got):
        if args[name] is not None:  # (for h0 or c0 None a backend may return anything: unused)
            assert rel_err(o, w) < 1e-12, name
        elif name not in ("h0", "c0"):
            assert w is None and o is None, name


def panel_products_here():
    with cpu_ext.panel_products(True):
        return cpu_ext.load().panel_products_here()


def cpu_fp32_run(args, cell, seed=5):
    """The C++ gated_fwd and gated_bwd on ``args`` (float32), a gradient at every h_t and c_t."""
    fwd = cpu_ext.gated_fwd(**args, cell=cell.name)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(fwd[0].shape, generator=g)
    grad_cs = torch.randn(fwd[1].shape, generator=g) if cell is cells.LSTM else None
    return list(fwd) + list(cpu_ext.gated_bwd(grad_out, grad_cs, *fwd, **args, cell=cell.name)), grad_out, grad_cs


# (T, B, H): B with a remainder call of rows, H not a multiple of 16 (a padded panel) and above 64
# (several of the backward's 64-column panels)
PANEL_SHAPES = tiered([(4, 23, 37), (3, 7, 70), (2, 1, 16), (3, 50, 129)], fast=[(4, 23, 37), (3, 7, 70)],
                      ids=lambda s: "T{}-B{}-H{}".format(*s))


@pytest.mark.skipif(cpu_ext.unavailable_reason() is not None or not panel_products_here(),
                    reason="the panel products need the C++ extension on a CPU with AVX-512")
@pytest.mark.parametrize("cell", [cells.LSTM, cells.GRU], ids=["lstm", "gru"])
@pytest.mark.parametrize("state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize("shape", PANEL_SHAPES)
def test_cpu_panel_products_match_the_loop_and_the_step_products(cell, state, shape):
    """The AVX-512 panel products (float32, where they run) and the oneDNN step products against
    the float64 reference loop, every output and gradient within fp32 rounding; and a row's bits
    do not depend on the thread count."""
    T, B, H = shape
    args = op_problem(cell, T=T, B=B, H=H, P=0, dtype=torch.float32, state=state)
    with cpu_ext.panel_products(True):
        panels, grad_out, grad_cs = cpu_fp32_run(args, cell)
    with cpu_ext.panel_products(False):
        steps, _, _ = cpu_fp32_run(args, cell)
    wide = {k: None if v is None else v.double() for k, v in args.items()}
    want = list(loop.gated_fwd(**wide, allow_tf32=False, cell=cell))
    want += loop.gated_bwd(grad_out.double(), None if grad_cs is None else grad_cs.double(), *want, **wide,
                           allow_tf32=False, cell=cell)
    names = ("out", "cs", "saved", "q", "w_hh", "b_hh", "h0", "c0", "w_hr")
    for name, got_panels, got_steps, w in zip(names, panels, steps, want):
        if w is None or w.numel() == 0 or (name in ("h0", "c0") and not state):
            continue
        assert rel_err(got_panels, w) < TOLERANCE[torch.float32], name
        assert rel_err(got_steps, w) < TOLERANCE[torch.float32], name
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with cpu_ext.panel_products(True):
            one_thread, _, _ = cpu_fp32_run(args, cell)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(panels[:4], one_thread[:4]):  # the recurrences' own results (not the GEMMs after)
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("cell,P", [(cells.LSTM, 0), (cells.LSTM, 2), (cells.GRU, 0)], ids=["lstm", "lstm-proj", "gru"])
def test_gradcheck_through_the_op(backend, cell, P):
    """fp64 gradcheck and gradgradcheck of the custom op itself (fast mode in the fast tier)."""
    device = backend_device(backend)
    args = op_problem(cell, T=4, B=3, H=4, P=P, dtype=torch.float64, state=True, seed=2)
    names = [k for k, v in args.items() if v is not None]
    leaves = [args[k].to(device).requires_grad_() for k in names]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        out, cs, _, h_n, c_n = gated_recurrence(*(given.get(k) for k in args), backend, False, cell.name, True)
        return (out, cs, h_n, c_n) if cs.numel() else (out, h_n)

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, leaves, fast_mode=True)


@exhaustive
@pytest.mark.parametrize("cell,P", [(cells.LSTM, 0), (cells.LSTM, 2), (cells.GRU, 0)], ids=["lstm", "lstm-proj", "gru"])
def test_gradcheck_full_mode_cpu(cell, P):
    args = op_problem(cell, T=5, B=2, H=3, P=P, dtype=torch.float64, state=True, seed=4)
    names = [k for k, v in args.items() if v is not None]
    leaves = [args[k].requires_grad_() for k in names]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        out, cs, _, h_n, c_n = gated_recurrence(*(given.get(k) for k in args), "cpu", False, cell.name, True)
        return (out, cs, h_n, c_n) if cs.numel() else (out, h_n)

    assert torch.autograd.gradcheck(fn, leaves)


def good_lstm_args(B=2, T=3, I=4, H=5):
    return dict(x=torch.randn(B, T, I), w_ih=torch.randn(4 * H, I), w_hh=torch.randn(4 * H, H),
                b_ih=torch.randn(4 * H), b_hh=torch.randn(4 * H))


@pytest.mark.parametrize("change,error", [
    (dict(w_hh=torch.randn(18, 5)), ValueError),  # not 4H rows
    (dict(w_hh=torch.randn(20, 4)), ValueError),  # P != H without w_hr
    (dict(w_ih=torch.randn(20, 3)), ValueError),  # I does not match x
    (dict(b_hh=torch.randn(19)), ValueError),
    (dict(h0=torch.randn(3, 5)), ValueError),  # wrong batch
    (dict(c0=torch.randn(2, 4)), ValueError),
    (dict(w_hr=torch.randn(3, 4)), ValueError),  # [P, H] with H = 5
    (dict(b_ih=torch.randn(20, dtype=torch.float64)), TypeError),
    (dict(x=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError),
    (dict(x=torch.randn(0, 3, 4)), ValueError),
], ids=["w_hh-rows", "w_hh-cols", "w_ih", "b_hh", "h0", "c0", "w_hr", "dtype", "int-x", "empty"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_lstm_refuses_bad_input(change, error, backend):
    with pytest.raises(error):
        fused_rnn.lstm(**{**good_lstm_args(), **change}, backend=backend)


def test_gru_refuses_lstm_sized_weights():
    with pytest.raises(ValueError):
        fused_rnn.gru(torch.randn(2, 3, 4), torch.randn(20, 4), torch.randn(20, 5))  # 4H rows: not 3H


def test_saved_gates_are_not_differentiable():
    args = op_problem(cells.LSTM, T=2, B=2, H=3, P=0, dtype=torch.float64, state=True)
    q = args["q"].requires_grad_()
    out, cs, saved, h_n, c_n = gated_recurrence(q, *list(args.values())[1:], "cpu", False, cells.LSTM.name, True)
    assert out.requires_grad and cs.requires_grad and not saved.requires_grad
    assert h_n.requires_grad and c_n.requires_grad
    assert torch.equal(h_n, out[-1]) and torch.equal(c_n, cs[-1])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_inference_keeps_no_gates_and_gives_the_same_results(kind):
    """Without a backward to come (no_grad, or no input needing a gradient) the op keeps no gates;
    the results are the same as with them (to rounding: BLAS may round differently per call)."""
    B, T, I, H = 3, 5, 4, 6
    module = make_module(kind, I, H, 0, True, seed=7, dtype=torch.float32)
    x = torch.randn(B, T, I)
    params = weights(module, kind)
    with torch.no_grad():
        out, finals = call(kind, x, [p.detach() for p in params[:4]] + params[4:], [None] * (2 if kind == "lstm" else 1),
                           None, "cpu")
    want, want_finals = call(kind, x, params, [None] * (2 if kind == "lstm" else 1), None, "cpu")
    for got, expected in zip([out, *finals], [want, *want_finals]):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    cell = cells.LSTM if kind == "lstm" else cells.GRU
    q = torch.randn(T, B, cell.gates * H)
    w = params[1].detach()
    b = params[3].detach() if cell.hidden_bias else None
    assert gated_recurrence(q, w, b, None, None, None, "cpu", False, cell.name, False)[2].numel() == 0


@pytest.mark.skipif(cpu_ext.unavailable_reason() is not None or not panel_products_here(),
                    reason="the panel products need the C++ extension on a CPU with AVX-512")
@pytest.mark.parametrize("kind,config", [(k, c) for k, c in _CASES if not c[4]][:6],
                         ids=lambda v: v if isinstance(v, str) else "B{}-T{}-I{}-H{}-P{}-{}-{}-{}".format(*v))
def test_cpu_inference_projects_inside_the_loop(kind, config, monkeypatch):
    """Float32 inference on the C++ backend (no gradient wanted) runs the input projection inside
    the time loop (gated_fwd given w_ih) and keeps no gates: outputs and final states within fp32
    rounding of torch's module in float64, and the same as the training path's to rounding."""
    B, T, I, H, P, h0, bias, lengths = config
    module = make_module(kind, I, H, P, bias, seed=7)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64)
    shapes = [(B, H), (B, H)] if kind == "lstm" else [(B, H)]
    states = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes] if h0 else [None] * len(shapes)
    lens = torch.randint(1, T + 1, (B,), generator=g) if lengths else None
    want = torch_call(module, kind, x, states, lens)
    params = [None if w is None else w.detach().float() for w in weights(module, kind)]
    low = [None if s is None else s.float() for s in states]
    calls = []
    ext = cpu_ext.load()
    monkeypatch.setattr(cpu_ext, "load", lambda: type("Spy", (), {  # a[7]: keep_saved, a[8]: w_ih
        "gated_fwd": lambda self, *a: calls.append((a[7], a[8] is not None)) or ext.gated_fwd(*a)})())
    with torch.no_grad():
        got = call(kind, x.float(), params, low, lens, "cpu")
    assert calls == [(False, True)], "the forward with the projection inside the loop did not run"
    monkeypatch.undo()
    trained = call(kind, x.float(), [None if p is None else p.requires_grad_() for p in params], low, lens, "cpu")
    for a, b, c in zip([got[0], *got[1]], [want[0], *want[1]], [trained[0], *trained[1]]):
        assert rel_err(a, b) < TOLERANCE[torch.float32]
        torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,used", [("lstm", "output"), ("lstm", "h_n"), ("lstm", "c_n"), ("gru", "output"),
                                       ("gru", "h_n")])
def test_gradient_through_one_result_alone(kind, used, backend):
    """A loss on one result alone: the others' gradients reach the op as None (not materialized
    zeros), and every gradient is still torch's (float64)."""
    B, T, I, H = 3, 5, 4, 7
    device = backend_device(backend)
    module = make_module(kind, I, H, 0, True, seed=5).to(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, I, generator=g, dtype=torch.float64).to(device).requires_grad_()
    params = weights(module, kind)
    leaves = [x] + [t for t in params if t is not None]
    states = [None] if kind == "gru" else [None, None]

    def grads(out, finals):
        result = {"output": out, "h_n": finals[0], "c_n": finals[-1]}[used]
        weights = torch.linspace(-1, 1, result.numel(), dtype=torch.float64, device=device).view(result.shape)
        return torch.autograd.grad((result * weights).sum(), leaves)

    ours = grads(*call(kind, x, params, states, None, backend))
    want = grads(*torch_call(module, kind, x, states, None))
    for got, expected in zip(ours, want):
        assert rel_err(got, expected) < 1e-10
