"""fused_rnn.RNN and RNNCell against torch.nn.RNN and nn.RNNCell themselves, and convert() on
models holding torch's modules. Float64, every output and every gradient, to 1e-9."""
import copy
import io
import random
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn.rnn
from fused_rnn import RNN, RNNCell, convert
from conftest import backend_device, tiered
from helpers import assert_same, rand, rel_err

BACKENDS = ["reference", "cpu", "triton"]  # each on its backend_device: CUDA or CPU
TOL = 1e-9
f64 = torch.float64


def torch_and_fused(backend, seed=0, **config):
    """nn.RNN and fused_rnn.RNN of one config, float64, holding equal weights, both on the
    device ``backend`` runs on."""
    device = backend_device(backend)
    torch.manual_seed(seed)
    ref = nn.RNN(**config, dtype=f64).to(device)
    fused = RNN(**config, dtype=f64, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def outputs_and_grads(module, x, hx, to_input=lambda x: x, seed=1):
    """{name: tensor}: the module's outputs, and the gradients of x, hx and every parameter
    under random output gradients."""
    out, h_n = module(to_input(x), hx)
    data = out.data if isinstance(out, PackedSequence) else out
    g = torch.Generator().manual_seed(seed)
    loss = (data * torch.randn(data.shape, generator=g, dtype=f64).to(data.device)).sum() \
        + (h_n * torch.randn(h_n.shape, generator=g, dtype=f64).to(h_n.device)).sum()
    params = {name.removeprefix("_orig_mod."): p for name, p in module.named_parameters()}  # compiled
    inputs = {"input": x, **({"hx": hx} if hx is not None else {}), **params}
    grads = torch.autograd.grad(loss, list(inputs.values()))
    result = {"output": data, "h_n": h_n, **{f"grad_{k}": v for k, v in zip(inputs, grads)}}
    if isinstance(out, PackedSequence):
        result.update(batch_sizes=out.batch_sizes, sorted_indices=out.sorted_indices,
                      unsorted_indices=out.unsorted_indices)
    return result


# Every value of every option, with odd sizes drawn at random (seeded) per config.
CONFIGS = [
    dict(nonlinearity="tanh", num_layers=1, bidirectional=False, batch_first=False, bias=True),
    dict(nonlinearity="relu", num_layers=1, bidirectional=True, batch_first=True, bias=True),
    dict(nonlinearity="tanh", num_layers=2, bidirectional=True, batch_first=False, bias=False),
    dict(nonlinearity="relu", num_layers=3, bidirectional=False, batch_first=True, bias=False),
    dict(nonlinearity="tanh", num_layers=3, bidirectional=True, batch_first=True, bias=True),
    dict(nonlinearity="relu", num_layers=2, bidirectional=True, batch_first=False, bias=True, dropout=0.4),
]


def config_id(c):
    return "-".join([c["nonlinearity"], f"L{c['num_layers']}", "bi" if c["bidirectional"] else "uni",
                     "bf" if c["batch_first"] else "tf", "bias" if c["bias"] else "nobias"]
                    + ([f"drop{c['dropout']}"] if "dropout" in c else []))


def sizes(i):
    r = random.Random(i)
    return dict(I=r.randint(1, 6), H=r.randint(1, 7), B=r.randint(2, 4), T=r.randint(2, 6))


@pytest.mark.parametrize("kind", ["padded", "packed-sorted", "packed-unsorted"])
@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[config_id(c) for c in CONFIGS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_matches_torch(backend, index, kind):
    device = backend_device(backend)
    config, s = CONFIGS[index], sizes(index)
    I, H, B, T = s["I"], s["H"], s["B"], s["T"]
    ref, fused = torch_and_fused(backend, index, input_size=I, hidden_size=H, **config)
    ref.eval(), fused.eval()  # dropout in eval mode: none
    D = 2 if config["bidirectional"] else 1
    shape = (B, T, I) if config["batch_first"] else (T, B, I)
    x = rand(*shape, seed=index, device=device)
    with_hx = (index + ["padded", "packed-sorted", "packed-unsorted"].index(kind)) % 2 == 0
    hx = rand(config["num_layers"] * D, B, H, seed=index + 100, device=device) if with_hx else None
    to_input = lambda x: x  # noqa: E731
    if kind != "padded":
        lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(index))
        lengths[0], lengths[-1] = 1, T  # uneven, and out of order before sorting
        if kind == "packed-sorted":
            lengths = lengths.sort(descending=True).values
        to_input = lambda x: pack_padded_sequence(  # noqa: E731
            x, lengths, batch_first=config["batch_first"], enforce_sorted=kind == "packed-sorted")
    assert_same(outputs_and_grads(fused, x, hx, to_input), outputs_and_grads(ref, x, hx, to_input))


@pytest.mark.parametrize("index", [0, 2, 3], ids=[config_id(CONFIGS[i]) for i in (0, 2, 3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_unbatched_input(backend, index):
    device = backend_device(backend)
    config = CONFIGS[index]
    ref, fused = torch_and_fused(backend, index, input_size=3, hidden_size=5, **config)
    D = 2 if config["bidirectional"] else 1
    x = rand(4, 3, seed=1, device=device)
    for hx in (None, rand(config["num_layers"] * D, 5, seed=2, device=device)):
        got, want = outputs_and_grads(fused, x, hx), outputs_and_grads(ref, x, hx)
        assert got["output"].shape == (4, 5 * D) and got["h_n"].shape == (config["num_layers"] * D, 5)
        assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_non_contiguous_input_and_hx(backend):
    device = backend_device(backend)
    ref, fused = torch_and_fused(backend, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    x = rand(3, 6, 6, seed=1, device=device)[:, :, ::2].transpose(0, 1)  # [T, B, I], strided both ways
    hx = rand(4, 3, 10, seed=2, device=device)[..., 1::2]
    assert not x.is_contiguous() and not hx.is_contiguous()
    got = outputs_and_grads(fused, x, hx)
    assert_same(got, outputs_and_grads(ref, x, hx))
    assert got["output"].is_contiguous()  # as torch's: code calls .view on it


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_empty_batch_gives_torch_empty_results(backend):
    ref, fused = torch_and_fused(backend, input_size=3, hidden_size=4, num_layers=2)
    x = torch.zeros(5, 0, 3, dtype=f64, device=backend_device(backend))
    for got, want in zip(fused(x), ref(x)):
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_empty_batch_with_hx_matches_torch(backend, batch_first):
    device = backend_device(backend)
    ref, fused = torch_and_fused(backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True,
                                 batch_first=batch_first)
    x = rand(*((0, 5, 3) if batch_first else (5, 0, 3)), device=device)
    hx = rand(4, 0, 4, seed=1, device=device)
    assert_same(outputs_and_grads(fused, x, hx), outputs_and_grads(ref, x, hx))


# (input_size, hidden_size, batch or None for unbatched input, with hx): torch.nn.RNNCell takes
# every zero size, and gives an empty result where hidden size or batch is 0.
CELL_ZERO_SIZES = [(i, h, b, hx) for i, h, b in [(10, 0, 3), (10, 0, None), (0, 10, 3), (0, 10, None), (0, 0, 3),
                                                 (4, 5, 0), (0, 5, 0), (4, 0, 0)] for hx in (True, False)]


def zero_sizes_id(case):
    i, h, b, hx = case
    return f"I{i}-H{h}-" + ("unbatched" if b is None else f"B{b}") + ("-hx" if hx else "")


@pytest.mark.parametrize("case", tiered(CELL_ZERO_SIZES, fast={(10, 0, 3, True), (10, 0, None, False),
                                                              (0, 10, 3, False), (0, 10, None, True),
                                                              (0, 0, 3, True), (4, 5, 0, True)},
                                        ids=zero_sizes_id))
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_cell_zero_sizes_match_torch(backend, case):
    I, H, B, with_hx = case
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = nn.RNNCell(I, H, dtype=f64, device=device)
    fused = RNNCell(I, H, dtype=f64, device=device, backend=backend)
    fused.load_state_dict(ref.state_dict())
    batch = () if B is None else (B,)
    x, hx = rand(*batch, I, seed=1, device=device), rand(*batch, H, seed=2, device=device) if with_hx else None
    results = []
    for module in (fused, ref):
        out = module(x, hx)
        inputs = [x] + ([hx] if with_hx else []) + list(module.parameters())
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=f64).to(device)
        results.append((out, torch.autograd.grad((out * g).sum(), inputs, allow_unused=True)))
    (got, got_grads), (want, want_grads) = results
    assert got.shape == want.shape == (*batch, H) and got.dtype == want.dtype
    for a, b in zip((got, *got_grads), (want, *want_grads), strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            assert a.shape == b.shape and (b.numel() == 0 or rel_err(a, b) < TOL)


@pytest.mark.parametrize("fast_mode", tiered([True, False], fast={True}), ids=["fast", "full"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_gradcheck(backend, fast_mode):
    """Finite differences through the module: 2 bidirectional layers on packed uneven sequences."""
    device = backend_device(backend)
    _, fused = torch_and_fused(backend, input_size=2, hidden_size=3, num_layers=2, bidirectional=True)
    names = [n for n, _ in fused.named_parameters()]
    lengths = torch.tensor([2, 3, 1])

    def run(x, hx, *params):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, h_n = torch.func.functional_call(fused, dict(zip(names, params)), (packed, hx))
        return out.data, h_n

    inputs = (rand(3, 3, 2, seed=1, device=device), rand(4, 3, 3, seed=2, device=device),
              *(p.detach().clone().requires_grad_() for p in fused.parameters()))
    assert torch.autograd.gradcheck(run, inputs, fast_mode=fast_mode)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_cell_matches_torch(backend, bias, nonlinearity):
    device = backend_device(backend)
    torch.manual_seed(0)
    ref = nn.RNNCell(4, 6, bias=bias, nonlinearity=nonlinearity, dtype=f64, device=device)
    fused = RNNCell(4, 6, bias=bias, nonlinearity=nonlinearity, dtype=f64, device=device, backend=backend)
    fused.load_state_dict(ref.state_dict())

    def r(*shape, seed):
        return rand(*shape, seed=seed, device=device)

    for x, hx in [(r(3, 4, seed=1), r(3, 6, seed=2)), (r(3, 4, seed=3), None),
                  (r(4, seed=4), r(6, seed=5)), (r(4, seed=6), None),
                  (r(5, 8, seed=7)[:, ::2], r(6, 5, seed=8).t())]:  # non-contiguous
        got, want = fused(x, hx), ref(x, hx)
        assert got.shape == want.shape
        assert rel_err(got, want) < TOL
        g = torch.randn(got.shape, dtype=f64, device=device)
        inputs = [x] + ([hx] if hx is not None else []) + list(ref.parameters())
        fused_inputs = [x] + ([hx] if hx is not None else []) + list(fused.parameters())
        for a, b in zip(torch.autograd.grad((got * g).sum(), fused_inputs),
                        torch.autograd.grad((want * g).sum(), inputs)):
            assert rel_err(a, b) < TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_rnn_cell_gradcheck(backend):
    device = backend_device(backend)
    cell = RNNCell(3, 4, dtype=f64, device=device, backend=backend)
    names = [n for n, _ in cell.named_parameters()]

    def run(x, hx, *params):
        return torch.func.functional_call(cell, dict(zip(names, params)), (x, hx))

    inputs = (rand(2, 3, seed=1, device=device), rand(2, 4, seed=2, device=device),
              *(p.detach().clone().requires_grad_() for p in cell.parameters()))
    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_in_training_draws_torch_masks(backend, batch_first):
    """Same seed, same masks as nn.RNN's (unpacked input; on CUDA torch's own loop, not cuDNN,
    which draws its masks inside the library): outputs and gradients equal."""
    device = backend_device(backend)
    ref, fused = torch_and_fused(backend, input_size=3, hidden_size=5, num_layers=3, bidirectional=True,
                                 dropout=0.5, batch_first=batch_first)
    x, hx = rand(4, 6, 3, seed=1, device=device), rand(6, 4 if batch_first else 6, 5, seed=2, device=device)
    results = []
    for m in (fused.train(), ref.train()):
        torch.manual_seed(7)
        with torch.backends.cudnn.flags(enabled=False):
            results.append(outputs_and_grads(m, x, hx))
    assert_same(*results)
    torch.manual_seed(8)
    assert not torch.equal(fused(x, hx)[0], results[0]["output"])  # a fresh mask each call


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_in_training_on_packed_input_has_torch_distribution(backend):
    """On packed input the masks differ from torch's, so the test pins the structure and the rate:
    with layer 1 an identity (relu(I x)), its output is layer 0's output times mask / (1 - p), for
    both modules; zeros at rate p; nothing dropped after the last layer or in layer 0's h_n."""
    p, B, T, H = 0.4, 40, 6, 8
    device = backend_device(backend)
    ref, fused = torch_and_fused(backend, input_size=3, hidden_size=H, num_layers=2,
                                 nonlinearity="relu", dropout=p)
    with torch.no_grad():
        for m in (ref, fused):
            m.weight_hh_l0.zero_(), m.bias_ih_l0.fill_(1.0)  # layer 0: relu(x W^T + 1) > 0
            m.weight_ih_l1.copy_(torch.eye(H, device=device)), m.weight_hh_l1.zero_(), m.bias_ih_l1.zero_(), m.bias_hh_l1.zero_()
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(0))
    x = pack_padded_sequence(0.1 * torch.randn(T, B, 3, dtype=f64, device=device), lengths, enforce_sorted=False)
    want_eval, h_eval = ref.eval()(x)
    assert (want_eval.data > 0).all()
    rates = []
    for m in (ref.train(), fused.train()):
        torch.manual_seed(1)
        out, h_n = m(x)
        ratio = out.data / want_eval.data
        kept = ratio != 0
        assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), rtol=1e-12)
        torch.testing.assert_close(h_n[0], h_eval[0], rtol=1e-12, atol=0)  # layer 0 undropped
        rates.append(1 - kept.double().mean().item())
    sigma = (p * (1 - p) / want_eval.data.numel()) ** 0.5
    assert all(abs(r - p) < 5 * sigma for r in rates), rates


# --- what code calls on nn.RNN keeps working ---------------------------------------------------


@pytest.mark.parametrize("config", [dict(num_layers=2, bidirectional=True, bias=False, batch_first=True,
                                         dropout=0.5, nonlinearity="relu"), dict()], ids=["all", "default"])
def test_same_parameters_init_repr_and_state_dict_both_ways(config):
    torch.manual_seed(3)
    ref = nn.RNN(4, 5, **config)
    torch.manual_seed(3)
    fused = RNN(4, 5, **config)
    assert repr(fused) == repr(ref)
    assert fused._flat_weights_names == ref._flat_weights_names
    assert [[p.shape for p in w] for w in fused.all_weights] == [[p.shape for p in w] for w in ref.all_weights]
    for (n1, p1), (n2, p2) in zip(fused.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)  # same names, shapes and init (same draws)
    fused2, ref2 = RNN(4, 5, **config), nn.RNN(4, 5, **config)
    fused2.load_state_dict(ref.state_dict(), strict=True)
    ref2.load_state_dict(fused2.state_dict(), strict=True)
    x = torch.randn(3, 2, 4)
    for m in (fused, fused2, ref2):
        torch.testing.assert_close(m.eval()(x), ref.eval()(x), rtol=1e-6, atol=1e-7)


def test_flatten_parameters_to_and_pickle():
    fused = RNN(3, 4, num_layers=2, bidirectional=True)
    params = list(fused.parameters())
    assert fused.flatten_parameters() is None and list(fused.parameters()) == params
    fused = fused.to(f64)
    assert all(p.dtype == f64 for p in fused.parameters()) and fused._flat_weights[0].dtype == f64
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = rand(3, 2, 3)
    torch.testing.assert_close(loaded(x), fused(x))
    torch.testing.assert_close(copy.deepcopy(fused)(x), fused(x))


def test_rnn_cell_same_init_repr_and_state_dict():
    torch.manual_seed(3)
    ref = nn.RNNCell(4, 5, bias=False, nonlinearity="relu")
    torch.manual_seed(3)
    fused = RNNCell(4, 5, bias=False, nonlinearity="relu")
    assert repr(fused) == repr(ref) and isinstance(fused, nn.RNNCell)
    assert fused.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fused.parameters(), ref.parameters(), strict=True))
    nn.RNNCell(4, 5, bias=False).load_state_dict(fused.state_dict(), strict=True)


@pytest.mark.parametrize("cls", [RNN, RNNCell])
def test_from_torch_holds_the_same_parameters(cls):
    torch_cls = nn.RNN if cls is RNN else nn.RNNCell
    kw = dict(num_layers=2, bidirectional=True, nonlinearity="relu") if cls is RNN else dict(bias=False)
    ref = torch_cls(3, 4, **kw).double().eval()
    twin = cls.from_torch(ref, backend="reference")
    assert isinstance(twin, cls) and not twin.training and twin.backend == "reference"
    assert [id(p) for p in twin.parameters()] == [id(p) for p in ref.parameters()]
    assert dict(twin.named_parameters()).keys() == dict(ref.named_parameters()).keys()
    x = rand(5, 2, 3) if cls is RNN else rand(2, 3)
    torch.testing.assert_close(twin(x), ref(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=r"takes a torch.nn.RNN(Cell)?, got LSTM(Cell)?"):
        cls.from_torch(nn.LSTM(3, 4) if cls is RNN else nn.LSTMCell(3, 4))


# --- bad input: torch's exception type, before any kernel runs --------------------------------


RNN_BAD_CALLS = {
    "4-D input": lambda m: m(torch.randn(2, 3, 4, 3)),
    "1-D input": lambda m: m(torch.randn(3)),
    "wrong input size": lambda m: m(torch.randn(5, 2, 7)),
    "input dtype": lambda m: m(torch.randn(5, 2, 3, dtype=f64)),
    "integer input": lambda m: m(torch.ones(5, 2, 3, dtype=torch.long)),
    "empty sequence": lambda m: m(torch.randn(0, 2, 3)),
    "empty sequence and batch": lambda m: m(torch.randn(0, 0, 3)),
    "empty unbatched sequence": lambda m: m(torch.randn(0, 3), torch.randn(2, 4)),
    "2-D hx for 3-D input": lambda m: m(torch.randn(5, 2, 3), torch.randn(2, 4)),
    "3-D hx for 2-D input": lambda m: m(torch.randn(5, 3), torch.randn(2, 1, 4)),
    "hx layers": lambda m: m(torch.randn(5, 2, 3), torch.randn(3, 2, 4)),
    "hx batch": lambda m: m(torch.randn(5, 2, 3), torch.randn(2, 3, 4)),
    "hx hidden": lambda m: m(torch.randn(5, 2, 3), torch.randn(2, 2, 5)),
    "unbatched hx hidden": lambda m: m(torch.randn(5, 3), torch.randn(2, 5)),
    "hx dtype": lambda m: m(torch.randn(5, 2, 3), torch.randn(2, 2, 4, dtype=f64)),
    "packed input size": lambda m: m(pack_padded_sequence(torch.randn(5, 2, 7), torch.tensor([5, 3]))),
    "packed hx batch": lambda m: m(pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3])),
                                   torch.randn(2, 3, 4)),
}

CELL_BAD_CALLS = {
    "3-D input": lambda m: m(torch.randn(2, 2, 3)),
    "3-D hx": lambda m: m(torch.randn(2, 3), torch.randn(1, 2, 4)),
    "wrong input size": lambda m: m(torch.randn(2, 5)),
    "hx batch": lambda m: m(torch.randn(2, 3), torch.randn(3, 4)),
    "hx hidden": lambda m: m(torch.randn(2, 3), torch.randn(2, 5)),
    "1-D hx for 2-D input": lambda m: m(torch.randn(2, 3), torch.randn(4)),
    "2-D hx for 1-D input": lambda m: m(torch.randn(3), torch.randn(1, 4)),
    "input dtype": lambda m: m(torch.randn(2, 3, dtype=f64)),
    "hx dtype": lambda m: m(torch.randn(2, 3), torch.randn(2, 4, dtype=f64)),
}


@pytest.fixture
def no_kernel(monkeypatch):
    """Any call into the recurrence fails the test: errors must come before it."""
    def ran(*args, **kwargs):
        raise AssertionError("the recurrence ran on bad input")
    monkeypatch.setattr(fused_rnn.rnn, "elman_rnn", ran)
    monkeypatch.setattr(fused_rnn.rnn, "elman_reference", ran)


def raised_by(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


@pytest.mark.parametrize("case", RNN_BAD_CALLS)
def test_rnn_bad_input_raises_what_torch_raises(case, no_kernel):
    want = raised_by(lambda: RNN_BAD_CALLS[case](nn.RNN(3, 4, 2)))
    got = raised_by(lambda: RNN_BAD_CALLS[case](RNN(3, 4, 2)))
    assert type(got) is type(want) and str(got), (got, want)


@pytest.mark.parametrize("case", CELL_BAD_CALLS)
def test_rnn_cell_bad_input_raises_what_torch_raises(case, no_kernel):
    want = raised_by(lambda: CELL_BAD_CALLS[case](nn.RNNCell(3, 4)))
    got = raised_by(lambda: CELL_BAD_CALLS[case](RNNCell(3, 4)))
    assert type(got) is type(want) and str(got), (got, want)


def test_cell_unknown_nonlinearity_fails_at_forward_like_torch(no_kernel):
    for cls in (nn.RNNCell, RNNCell):
        cell = cls(3, 4, nonlinearity="gelu")  # torch builds it, and refuses at the call
        with pytest.raises(RuntimeError, match="Unknown nonlinearity: gelu"):
            cell(torch.randn(2, 3))


@pytest.mark.parametrize("kwargs", [dict(nonlinearity="gelu"), dict(dropout=1.5), dict(dropout=-0.1),
                                    dict(dropout=True), dict(hidden_size=0), dict(hidden_size=4.0),
                                    dict(input_size=0), dict(num_layers=0), dict(bias=1),
                                    # torch refuses proj_size whatever its value, before the nonlinearity
                                    dict(proj_size=0), dict(proj_size=2), dict(proj_size=2, nonlinearity="gelu")],
                         ids=repr)
def test_rnn_bad_constructor_raises_what_torch_raises(kwargs):
    args = {**dict(input_size=3, hidden_size=4, num_layers=2), **kwargs}
    want = raised_by(lambda: nn.RNN(**args))
    got = raised_by(lambda: RNN(**args))
    assert type(got) is type(want) and str(got) == str(want)


def test_every_constructor_argument_torch_takes_is_taken():
    """Each argument nn.RNN and nn.RNNCell take, by keyword and by position, builds the same
    module (proj_size: see test_rnn_bad_constructor_raises_what_torch_raises). nn.RNNCell takes
    device and dtype by position too; nn.RNN's 9th positional argument is proj_size at run time,
    so code passes them by keyword."""
    rnn = dict(input_size=3, hidden_size=4, num_layers=2, nonlinearity="relu", bias=False, batch_first=True,
               dropout=0.5, bidirectional=True, device="cpu", dtype=f64)
    cell = dict(input_size=3, hidden_size=4, bias=False, nonlinearity="relu", device="cpu", dtype=f64)
    pairs = [(nn.RNN(**rnn), RNN(**rnn)), (nn.RNN(*list(rnn.values())[:8], device="cpu", dtype=f64),
                                            RNN(*list(rnn.values())[:8], device="cpu", dtype=f64)),
             (nn.RNNCell(**cell), RNNCell(**cell)), (nn.RNNCell(*cell.values()), RNNCell(*cell.values()))]
    for want, got in pairs:
        assert repr(got) == repr(want)
        assert [(n, p.shape, p.dtype) for n, p in got.named_parameters()] == \
            [(n, p.shape, p.dtype) for n, p in want.named_parameters()]


def test_rnn_dropout_with_one_layer_warns_like_torch():
    for cls in (nn.RNN, RNN):
        with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
            cls(3, 4, dropout=0.2)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        RNN(3, 4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        RNNCell(3, 4, backend="gpu")


# --- convert() ---------------------------------------------------------------------------------


class Tagger(nn.Module):
    """A model holding several torch recurrent modules (the LSTM's twin: test_gated_modules.py)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.RNN(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.stack = nn.Sequential(nn.RNN(12, 5, nonlinearity="relu", batch_first=True))
        self.cell = nn.RNNCell(5, 5)
        self.lstm = nn.LSTM(5, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.encoder(x)
        y, h_n = self.stack(y)
        h = self.cell(y[:, -1], h_n[0])
        z, _ = self.lstm(y)
        return self.head(z[:, -1]) + h.sum(-1, keepdim=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_swaps_every_torch_rnn_keeping_parameters_and_optimizer(backend):
    device = backend_device(backend)
    torch.manual_seed(0)
    model = Tagger().double().to(device)
    original = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # made before convert, kept after
    original_opt = torch.optim.SGD(original.parameters(), lr=0.5)
    params = list(model.parameters())

    assert convert(model, backend=backend) is model
    assert type(model.encoder) is RNN and type(model.stack[0]) is RNN and type(model.cell) is RNNCell
    assert type(model.lstm) is fused_rnn.LSTM and model.encoder.backend == backend
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert model.state_dict().keys() == original.state_dict().keys()

    x = rand(3, 5, 4, seed=1, device=device)
    losses = []
    for m, o in ((model, opt), (original, original_opt)):
        o.zero_grad()
        loss = (m(x) ** 2).sum()
        loss.backward()
        losses.append(loss)
    assert rel_err(losses[0], losses[1]) < TOL
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < TOL, name
    before = [p.detach().clone() for p in params]
    opt.step(), original_opt.step()
    for (name, p), b, q in zip(model.named_parameters(), before, original.parameters(), strict=True):
        assert not torch.equal(p, b), name  # the optimizer moved the twin's own parameters
        assert rel_err(p, q) < TOL, name


def test_convert_keeps_training_mode_device_and_dtype_and_converts_the_root():
    model = nn.Sequential(nn.RNN(3, 4), nn.RNNCell(3, 4)).double().eval()
    convert(model)
    assert all(not m.training for m in model) and model[0].weight_ih_l0.dtype == f64
    root = convert(nn.RNN(3, 4))
    assert type(root) is RNN and root.training


def test_convert_leaves_forward_overrides_alone():
    class MyRNN(nn.RNN):
        def forward(self, x, hx=None):
            return super().forward(x.flip(0), hx)

    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x.flip(0), hx)

    model = nn.ModuleDict(dict(mine=MyRNN(3, 4), lstm=MyLSTM(3, 4), linear=nn.Linear(3, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # by default: silently
        convert(model)
    assert [type(m) for m in model.values()] == [MyRNN, MyLSTM, nn.Linear]
    with pytest.warns(UserWarning) as record:
        convert(model, classes=[nn.LSTM, nn.RNN, nn.Linear])
    messages = [str(w.message) for w in record]
    # with classes=, every converter is tried, and the warning gives each one's reason
    assert any("left Linear alone" in m and "Linear has no fused twin" in m for m in messages), messages
    assert any("left MyRNN alone" in m and "its class MyRNN overrides forward" in m for m in messages), messages
    assert any("left MyLSTM alone" in m and "its class MyLSTM overrides forward" in m for m in messages), messages
    assert [type(m) for m in model.values()] == [MyRNN, MyLSTM, nn.Linear]


def test_convert_leaves_a_parametrized_rnn_alone():
    rnn = nn.RNN(3, 4)
    torch.nn.utils.parametrize.register_parametrization(rnn, "weight_hh_l0", nn.Identity())
    tree = nn.Sequential(rnn)
    with pytest.warns(UserWarning, match="beyond RNN's own"):
        convert(tree, classes=[nn.RNN])
    assert tree[0] is rnn


# --- the ecosystem -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", tiered(["reference", "cpu"], fast={"cpu"}))
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    device = backend_device(backend)
    _, fused = torch_and_fused(backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    compiled = torch.compile(fused, fullgraph=True)  # a graph break would raise
    x, hx = rand(3, 2, 3, seed=1, device=device), rand(4, 2, 4, seed=2, device=device)
    assert_same(outputs_and_grads(compiled, x, hx), outputs_and_grads(fused, x, hx))


def test_autocast_runs_in_the_autocast_dtype_as_torch_does():
    ref, fused = torch_and_fused("reference", input_size=3, hidden_size=8, num_layers=2)
    ref.cpu().float(), fused.cpu().float()  # (CPU autocast: on a GPU machine they start on CUDA)
    cell = RNNCell(3, 8, backend="reference")
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, h_n), (want_out, want_h_n) = fused(x), ref(x)
        h = cell(x[0])
    assert out.dtype == h_n.dtype == want_out.dtype == want_h_n.dtype == h.dtype == torch.bfloat16
    want, _ = fused.double()(x.double())
    assert rel_err(out, want) < 3e-2


# Hypothesis examples per backend (the interpreter is slow).
EXAMPLES = {"reference": 25, "cpu": 25, "triton": 6}


@pytest.mark.exhaustive
@pytest.mark.parametrize("backend", list(EXAMPLES))
def test_property_random_configs_match_torch(backend):
    """Random options, sizes (T = 1 included), hx or not, padded or packed (sorted or not)."""
    device = backend_device(backend)

    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(nonlinearity=st.sampled_from(["tanh", "relu"]), num_layers=st.integers(1, 3),
           bidirectional=st.booleans(), batch_first=st.booleans(), bias=st.booleans(),
           I=st.integers(1, 5), H=st.integers(1, 6), B=st.integers(1, 4), T=st.integers(1, 6),
           hx=st.booleans(), packing=st.sampled_from([None, True, False]), seed=st.integers(0, 2 ** 16))
    def check(nonlinearity, num_layers, bidirectional, batch_first, bias, I, H, B, T, hx, packing, seed):
        ref, fused = torch_and_fused(backend, seed, input_size=I, hidden_size=H, num_layers=num_layers,
                                     nonlinearity=nonlinearity, bidirectional=bidirectional,
                                     batch_first=batch_first, bias=bias)
        D = 2 if bidirectional else 1
        x = rand(*((B, T, I) if batch_first else (T, B, I)), seed=seed, device=device)
        h = rand(num_layers * D, B, H, seed=seed + 1, device=device) if hx else None
        to_input = lambda x: x  # noqa: E731
        if packing is not None:
            lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
            if packing:
                lengths = lengths.sort(descending=True).values
            to_input = lambda x: pack_padded_sequence(x, lengths, batch_first=batch_first,  # noqa: E731
                                                      enforce_sorted=packing)
        assert_same(outputs_and_grads(fused, x, h, to_input), outputs_and_grads(ref, x, h, to_input))

    check()
