"""fused_rnn.LSTM, GRU, LSTMCell and GRUCell against torch.nn.LSTM, GRU, LSTMCell and GRUCell
themselves: float64, every output, final state and gradient (input, states, every parameter) to
1e-9, over the input forms (batched, unbatched, batch first, packed sorted or not), hx or none,
layers, directions, proj_size and bias; dropout masks, state dicts, errors, from_torch, convert()
and torch.compile. The sequence twins share the RNN twin's layer loop (test_nn_rnn.py)."""
import copy
import io
import random
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
import fused_rnn.gated_rnn
from fused_rnn import GRU, LSTM, GRUCell, LSTMCell, convert
from conftest import backend_device, exhaustive, tiered
from helpers import assert_same, rand, rel_err

BACKENDS = ["reference", "cpu"]
TOL = 1e-9
f64 = torch.float64
TWIN = {nn.LSTM: LSTM, nn.GRU: GRU, nn.LSTMCell: LSTMCell, nn.GRUCell: GRUCell}


def pair(torch_cls, backend, seed=0, **config):
    """torch's module and its twin of one config, float64, holding equal weights, both on the
    device ``backend`` runs on."""
    device = backend_device(backend)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        ref = torch_cls(**config, dtype=f64).to(device)
        twin = TWIN[torch_cls](**config, dtype=f64, backend=backend).to(device)
    twin.load_state_dict(ref.state_dict())
    return ref, twin


def tensors(value):
    """The tensors of an input, output or state, in order (a PackedSequence by its data)."""
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, torch.Tensor):
        return [value]
    if value is None:
        return []
    return [t for v in value for t in tensors(v)]


def outputs_and_grads(module, x, hx, to_input=lambda x: x, seed=1):
    """{name: tensor}: every output of ``module`` (final states included), and the gradients of x,
    of each part of hx and of every parameter under seeded random output gradients."""
    result = module(to_input(x), hx)
    outs = tensors(result)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=f64).to(o.device)).sum() for o in outs)
    params = {name.removeprefix("_orig_mod."): p for name, p in module.named_parameters()}  # compiled
    inputs = {"input": x, **{f"hx{i}": t for i, t in enumerate(tensors(hx))}, **params}
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    found = {f"out{i}": o for i, o in enumerate(outs)}
    found.update({f"grad_{k}": v for k, v in zip(inputs, grads)})
    first = result[0] if isinstance(result, tuple) else result
    if isinstance(first, PackedSequence):
        found.update(batch_sizes=first.batch_sizes, sorted_indices=first.sorted_indices,
                     unsorted_indices=first.unsorted_indices)
    return found


# --- the sequence modules: every option, every input form ---------------------------------------

FORMS = ["padded", "packed-sorted", "packed-unsorted", "unbatched"]

# (module, options, input form, with hx): each option and form at least once per module.
CASES = [
    (nn.LSTM, dict(), "padded", False),
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True, proj_size=2), "packed-unsorted", True),
    (nn.LSTM, dict(num_layers=2, bias=False, proj_size=1), "packed-sorted", False),
    (nn.LSTM, dict(bidirectional=True, batch_first=True, bias=False), "unbatched", True),
    (nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=2), "padded", True),
    (nn.LSTM, dict(batch_first=True, proj_size=2), "unbatched", False),
    (nn.LSTM, dict(num_layers=2, bidirectional=True), "packed-sorted", True),
    (nn.GRU, dict(), "padded", True),
    (nn.GRU, dict(num_layers=2, bidirectional=True, batch_first=True), "packed-unsorted", False),
    (nn.GRU, dict(num_layers=2, bias=False), "packed-sorted", True),
    (nn.GRU, dict(bidirectional=True, batch_first=True, bias=False), "unbatched", False),
    (nn.GRU, dict(num_layers=2, bidirectional=True), "unbatched", True),
    (nn.GRU, dict(num_layers=2, bidirectional=True, batch_first=True), "packed-unsorted", True),
]


def random_case(i):
    """A seeded random configuration, for the exhaustive sweep."""
    r = random.Random(i)
    torch_cls = r.choice([nn.LSTM, nn.GRU])
    config = dict(num_layers=r.randint(1, 2), bidirectional=r.random() < 0.5, batch_first=r.random() < 0.5,
                  bias=r.random() < 0.7)
    if torch_cls is nn.LSTM and r.random() < 0.5:
        config["proj_size"] = r.randint(1, 2)
    return torch_cls, config, r.choice(FORMS), r.random() < 0.5


def case_id(case):
    torch_cls, config, form, with_hx = case
    options = [f"{k}={v}" for k, v in config.items()]
    return "-".join([torch_cls.__name__, *options, form] + (["hx"] if with_hx else []))


def check_sequence(backend, case, seed):
    torch_cls, config, form, with_hx = case
    device = backend_device(backend)
    r = random.Random(seed)
    I, B, T = r.randint(1, 5), r.randint(2, 4), r.randint(2, 6)
    H = r.randint(config.get("proj_size", 0) + 1, 6)
    ref, twin = pair(torch_cls, backend, seed, input_size=I, hidden_size=H, **config)
    ref.eval(), twin.eval()
    L, D, P = config.get("num_layers", 1), 2 if config.get("bidirectional") else 1, config.get("proj_size") or H
    batch = () if form == "unbatched" else (B,)
    shape = (T, I) if form == "unbatched" else (B, T, I) if config.get("batch_first") else (T, B, I)
    x = rand(*shape, seed=seed, device=device)
    hx = None
    if with_hx:
        h = rand(L * D, *batch, P, seed=seed + 1, device=device)
        hx = (h, rand(L * D, *batch, H, seed=seed + 2, device=device)) if torch_cls is nn.LSTM else h
    to_input = lambda x: x  # noqa: E731
    if form.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
        lengths[0], lengths[-1] = 1, T  # uneven, and out of order before sorting
        if form == "packed-sorted":
            lengths = lengths.sort(descending=True).values
        to_input = lambda x: pack_padded_sequence(  # noqa: E731
            x, lengths, batch_first=config.get("batch_first", False), enforce_sorted=form == "packed-sorted")
    got, want = outputs_and_grads(twin, x, hx, to_input), outputs_and_grads(ref, x, hx, to_input)
    states = 2 if torch_cls is nn.LSTM else 1
    assert got["out1"].shape == (L * D, *batch, P) and (states == 1 or got["out2"].shape == (L * D, *batch, H))
    assert_same(got, want)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_module_matches_torch(backend, case):
    check_sequence(backend, case, CASES.index(case))


@exhaustive
@pytest.mark.parametrize("index", range(60))
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_configurations_match_torch(backend, index):
    check_sequence(backend, random_case(index), 1000 + index)


@pytest.mark.parametrize("torch_cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_hx(backend, torch_cls):
    device = backend_device(backend)
    ref, twin = pair(torch_cls, backend, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    x = rand(3, 6, 6, seed=1, device=device)[:, :, ::2].transpose(0, 1)  # [T, B, I], strided both ways
    h = rand(4, 3, 10, seed=2, device=device)[..., 1::2]
    hx = (h, rand(4, 3, 10, seed=3, device=device)[..., ::2]) if torch_cls is nn.LSTM else h
    assert not x.is_contiguous() and not h.is_contiguous()
    got = outputs_and_grads(twin, x, hx)
    assert_same(got, outputs_and_grads(ref, x, hx))
    assert got["out0"].is_contiguous()  # as torch's: code calls .view on it


@pytest.mark.parametrize("torch_cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_matches_torch(backend, torch_cls):
    device = backend_device(backend)
    config = dict(proj_size=2) if torch_cls is nn.LSTM else {}
    ref, twin = pair(torch_cls, backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True, **config)
    x = rand(5, 0, 3, device=device)
    h = rand(4, 0, config.get("proj_size", 4), seed=1, device=device)
    for hx in (None, (h, rand(4, 0, 4, seed=2, device=device)) if torch_cls is nn.LSTM else h):
        assert_same(outputs_and_grads(twin, x, hx), outputs_and_grads(ref, x, hx))


# --- dropout between layers ----------------------------------------------------------------------


@pytest.mark.parametrize("torch_cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_in_training_draws_torch_masks(backend, torch_cls):
    """Unpacked input on the CPU: the same seed, the same masks as torch's module."""
    device = backend_device(backend)
    config = dict(proj_size=3) if torch_cls is nn.LSTM else {}
    ref, twin = pair(torch_cls, backend, input_size=3, hidden_size=5, num_layers=3, bidirectional=True,
                     dropout=0.5, batch_first=True, **config)
    x = rand(4, 6, 3, seed=1, device=device)
    h = rand(6, 4, config.get("proj_size", 5), seed=2, device=device)
    hx = (h, rand(6, 4, 5, seed=3, device=device)) if torch_cls is nn.LSTM else h
    results = []
    for m in (twin.train(), ref.train()):
        torch.manual_seed(7)
        with torch.backends.cudnn.flags(enabled=False):
            results.append(outputs_and_grads(m, x, hx))
    assert_same(*results)
    torch.manual_seed(8)
    assert not torch.equal(twin(x, hx)[0], results[0]["out0"])  # a fresh mask each call


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_in_training_on_packed_input(backend):
    """Packed input: masks of torch's distribution (the RNN twin's test pins it); here, that the
    output is dropped and layer 0's final states are not."""
    device = backend_device(backend)
    ref, twin = pair(nn.LSTM, backend, input_size=3, hidden_size=6, num_layers=2, dropout=0.5)
    x = pack_padded_sequence(rand(5, 4, 3, device=device), torch.tensor([2, 5, 1, 4]), enforce_sorted=False)
    out_eval, (h_eval, c_eval) = twin.eval()(x)
    torch.manual_seed(0)
    out, (h_n, c_n) = twin.train()(x)
    assert not torch.allclose(out.data, out_eval.data)
    torch.testing.assert_close(h_n[0], h_eval[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(c_n[0], c_eval[0], rtol=1e-12, atol=0)


# --- the cells -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("torch_cls", [nn.LSTMCell, nn.GRUCell], ids=["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_matches_torch(backend, torch_cls, bias, batched, with_hx):
    device = backend_device(backend)
    ref, twin = pair(torch_cls, backend, input_size=4, hidden_size=6, bias=bias)
    batch = (3,) if batched else ()
    x = rand(*batch, 4, seed=1, device=device)
    hx = None
    if with_hx:
        h = rand(*batch, 6, seed=2, device=device)
        hx = (h, rand(*batch, 6, seed=3, device=device)) if torch_cls is nn.LSTMCell else h
    got = outputs_and_grads(twin, x, hx)
    assert got["out0"].shape == (*batch, 6)
    assert_same(got, outputs_and_grads(ref, x, hx))


# (input_size, hidden_size, batch or None for unbatched input): torch's cells take every zero size.
CELL_ZERO_SIZES = [(4, 0, 3), (4, 0, None), (0, 5, 3), (0, 5, None), (0, 0, 2), (4, 5, 0)]


@pytest.mark.parametrize("size", tiered(CELL_ZERO_SIZES, fast={(4, 0, 3), (0, 5, None), (4, 5, 0)}),
                         ids=lambda s: f"I{s[0]}-H{s[1]}-B{s[2]}")
@pytest.mark.parametrize("torch_cls", [nn.LSTMCell, nn.GRUCell], ids=["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cell_zero_sizes_match_torch(backend, torch_cls, size):
    I, H, B = size
    device = backend_device(backend)
    ref, twin = pair(torch_cls, backend, input_size=I, hidden_size=H)
    batch = () if B is None else (B,)
    x, h = rand(*batch, I, seed=1, device=device), rand(*batch, H, seed=2, device=device)
    hx = (h, rand(*batch, H, seed=3, device=device)) if torch_cls is nn.LSTMCell else h
    for state in (None, hx):
        assert_same(outputs_and_grads(twin, x, state), outputs_and_grads(ref, x, state))


# --- what code calls on torch's modules keeps working -------------------------------------------

MODULE_CONFIGS = [
    (nn.LSTM, dict(num_layers=2, bidirectional=True, proj_size=2, bias=False, batch_first=True, dropout=0.5)),
    (nn.LSTM, dict()),
    (nn.GRU, dict(num_layers=2, bidirectional=True, bias=False, dropout=0.3)),
    (nn.LSTMCell, dict(bias=False)),
    (nn.GRUCell, dict()),
]


def probe_input(torch_cls):
    return rand(3, 2, 4, seed=5).detach() if issubclass(torch_cls, nn.RNNBase) else rand(2, 4, seed=5).detach()


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # torch's, in float32
@pytest.mark.parametrize("torch_cls, config", MODULE_CONFIGS, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_same_parameters_init_repr_and_state_dict_both_ways(torch_cls, config):
    torch.manual_seed(3)
    ref = torch_cls(4, 5, **config)
    torch.manual_seed(3)
    twin = TWIN[torch_cls](4, 5, **config)
    assert repr(twin) == repr(ref)
    if issubclass(torch_cls, nn.RNNBase):
        assert isinstance(twin, nn.RNNBase) and not isinstance(twin, torch_cls)  # so torch.compile traces it
        assert twin._flat_weights_names == ref._flat_weights_names
    else:
        assert isinstance(twin, torch_cls)
    for (n1, p1), (n2, p2) in zip(twin.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)  # same names, shapes and init (same draws)
    twin2, ref2 = TWIN[torch_cls](4, 5, **config), torch_cls(4, 5, **config)
    twin2.load_state_dict(ref.state_dict(), strict=True)
    ref2.load_state_dict(twin2.state_dict(), strict=True)
    x = probe_input(torch_cls).float()
    want = tensors(ref.eval()(x))
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    for m in (twin, twin2, ref2, torch.load(buf, weights_only=False), copy.deepcopy(twin)):
        for g, w in zip(tensors(m.eval()(x)), want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


def test_every_constructor_argument_torch_takes_is_taken():
    """Each argument torch's modules take, by keyword and by position, builds the same module.
    nn.GRU's 8th positional argument is proj_size at run time (refused), so code passes device and
    dtype by keyword; the cells take them by position too."""
    lstm = dict(input_size=3, hidden_size=4, num_layers=2, bias=False, batch_first=True, dropout=0.5,
                bidirectional=True, proj_size=2, device="cpu", dtype=f64)
    gru = {k: v for k, v in lstm.items() if k != "proj_size"}
    cell = dict(input_size=3, hidden_size=4, bias=False, device="cpu", dtype=f64)
    pairs = [(nn.LSTM(**lstm), LSTM(**lstm)), (nn.LSTM(*lstm.values()), LSTM(*lstm.values())),
             (nn.GRU(**gru), GRU(**gru)), (nn.GRU(*list(gru.values())[:7], device="cpu", dtype=f64),
                                           GRU(*list(gru.values())[:7], device="cpu", dtype=f64))]
    for torch_cls in (nn.LSTMCell, nn.GRUCell):
        pairs += [(torch_cls(**cell), TWIN[torch_cls](**cell)),
                  (torch_cls(*cell.values()), TWIN[torch_cls](*cell.values()))]
    for want, got in pairs:
        assert repr(got) == repr(want)
        assert [(n, p.shape, p.dtype) for n, p in got.named_parameters()] == \
            [(n, p.shape, p.dtype) for n, p in want.named_parameters()]


def raised_by(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


@pytest.mark.parametrize("torch_cls, kwargs", [
    (nn.LSTM, dict(proj_size=4)), (nn.LSTM, dict(proj_size=5)), (nn.LSTM, dict(proj_size=-1)),
    (nn.GRU, dict(proj_size=0)), (nn.GRU, dict(proj_size=2)), (nn.LSTM, dict(dropout=1.5)),
    (nn.GRU, dict(hidden_size=0)), (nn.LSTM, dict(num_layers=0)), (nn.GRU, dict(bias=1)),
    (nn.LSTM, dict(batch_first="no")), (nn.GRU, dict(input_size=2.0))], ids=repr)
def test_bad_constructor_raises_what_torch_raises(torch_cls, kwargs):
    args = {**dict(input_size=3, hidden_size=4, num_layers=2), **kwargs}
    want = raised_by(lambda: torch_cls(**args))
    got = raised_by(lambda: TWIN[torch_cls](**args))
    assert type(got) is type(want) and str(got) == str(want)


def test_dropout_with_one_layer_warns_and_unknown_backend_is_refused():
    for cls in (nn.LSTM, LSTM, nn.GRU, GRU):
        with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
            cls(3, 4, dropout=0.2)
    for cls in TWIN.values():
        with pytest.raises(ValueError, match="backend must be one of"):
            cls(3, 4, backend="gpu")


# --- bad input: torch's exception type (and message), before any kernel runs ---------------------

h = torch.randn


def packed(x, lengths, sorted_=True):
    return pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=sorted_)


SEQUENCE_BAD_CALLS = {  # on a module (3, 4, num_layers=2); hx of the LSTM: (h, c)
    "4-D input": lambda m, s: m(h(2, 3, 4, 3)),
    "1-D input": lambda m, s: m(h(3)),
    "wrong input size": lambda m, s: m(h(5, 2, 7)),
    "input dtype": lambda m, s: m(h(5, 2, 3, dtype=f64)),
    "integer input": lambda m, s: m(torch.ones(5, 2, 3, dtype=torch.long)),
    "empty sequence": lambda m, s: m(h(0, 2, 3)),
    "empty sequence and batch": lambda m, s: m(h(0, 0, 3)),
    "empty unbatched sequence": lambda m, s: m(h(0, 3), s(h(2, 4), h(2, 4))),
    "2-D hx for 3-D input": lambda m, s: m(h(5, 2, 3), s(h(2, 4), h(2, 2, 4))),
    "2-D cx for 3-D input": lambda m, s: m(h(5, 2, 3), s(h(2, 2, 4), h(2, 4))),
    "3-D hx for 2-D input": lambda m, s: m(h(5, 3), s(h(2, 1, 4), h(2, 4))),
    "hx layers": lambda m, s: m(h(5, 2, 3), s(h(3, 2, 4), h(3, 2, 4))),
    "hx batch": lambda m, s: m(h(5, 2, 3), s(h(2, 3, 4), h(2, 2, 4))),
    "cx batch": lambda m, s: m(h(5, 2, 3), s(h(2, 2, 4), h(2, 3, 4))),
    "hx hidden": lambda m, s: m(h(5, 2, 3), s(h(2, 2, 5), h(2, 2, 4))),
    "cx hidden": lambda m, s: m(h(5, 2, 3), s(h(2, 2, 4), h(2, 2, 5))),
    "unbatched hx hidden": lambda m, s: m(h(5, 3), s(h(2, 5), h(2, 4))),
    "hx dtype": lambda m, s: m(h(5, 2, 3), s(h(2, 2, 4, dtype=f64), h(2, 2, 4))),
    "cx dtype": lambda m, s: m(h(5, 2, 3), s(h(2, 2, 4), h(2, 2, 4, dtype=f64))),
    "packed input size": lambda m, s: m(packed(h(5, 2, 7), [5, 3])),
    "packed input dtype": lambda m, s: m(packed(h(5, 2, 3, dtype=f64), [5, 3])),
    "packed hx batch": lambda m, s: m(packed(h(5, 2, 3), [5, 3]), s(h(2, 3, 4), h(2, 3, 4))),
    "packed hx hidden": lambda m, s: m(packed(h(5, 2, 3), [5, 3]), s(h(2, 2, 5), h(2, 2, 4))),
    "packed hx layers": lambda m, s: m(packed(h(5, 2, 3), [5, 3]), s(h(3, 2, 4), h(3, 2, 4))),
    "packed hx dtype": lambda m, s: m(packed(h(5, 2, 3), [5, 3]), s(h(2, 2, 4, dtype=f64), h(2, 2, 4))),
    "unsorted packed hx too small": lambda m, s: m(packed(h(5, 3, 3), [3, 5, 2], False), s(h(2, 2, 4), h(2, 2, 4))),
}
LSTM_ONLY_BAD_CALLS = {
    "tensor hx": lambda m: m(h(5, 2, 3), h(2, 2, 4)),
    "one-part hx": lambda m: m(h(5, 2, 3), (h(2, 2, 4),)),
    "proj hx size": lambda m: m(h(5, 2, 3), (h(2, 2, 4), h(2, 2, 4))),  # with proj_size=2
}
CELL_BAD_CALLS = {  # on a cell (3, 4); hx of the LSTMCell: (h, c)
    "3-D input": lambda m, s: m(h(2, 2, 3)),
    "0-D input": lambda m, s: m(h(())),
    "3-D hx": lambda m, s: m(h(2, 3), s(h(1, 2, 4), h(2, 4))),
    "3-D cx": lambda m, s: m(h(2, 3), s(h(2, 4), h(1, 2, 4))),
    "wrong input size": lambda m, s: m(h(2, 5)),
    "hx batch": lambda m, s: m(h(2, 3), s(h(3, 4), h(2, 4))),
    "cx batch": lambda m, s: m(h(2, 3), s(h(2, 4), h(3, 4))),
    "hx hidden": lambda m, s: m(h(2, 3), s(h(2, 5), h(2, 4))),
    "cx hidden": lambda m, s: m(h(2, 3), s(h(2, 4), h(2, 5))),
    "1-D hx for 2-D input": lambda m, s: m(h(2, 3), s(h(4), h(4))),
    "1-D hx of batch size for 2-D input": lambda m, s: m(h(4, 3), s(h(4), h(4))),
    "2-D hx for 1-D input": lambda m, s: m(h(3), s(h(1, 4), h(1, 4))),
    "input dtype": lambda m, s: m(h(2, 3, dtype=f64)),
    "integer input": lambda m, s: m(torch.ones(2, 3, dtype=torch.long)),
    "hx dtype": lambda m, s: m(h(2, 3), s(h(2, 4, dtype=f64), h(2, 4))),
}
LSTM_CELL_ONLY_BAD_CALLS = {
    "tensor hx": lambda m: m(h(2, 3), h(2, 2, 4)),
    "one-part hx": lambda m: m(h(2, 3), (h(2, 4),)),
    "three-part hx": lambda m: m(h(2, 3), (h(2, 4), h(2, 4), h(2, 4))),
}
# Where torch's message comes from deep inside ATen (its GEMM, oneDNN, the stacked loop: its LSTM
# leaves packed input unchecked), the twin raises torch's exception type saying what is wrong.
ATEN_MESSAGES = {"hx dtype", "cx dtype", "packed input size", "packed input dtype", "packed hx batch",
                 "packed hx hidden", "packed hx layers", "packed hx dtype", "input dtype", "integer input",
                 "1-D hx of batch size for 2-D input"}


def lstm_state(h, c):
    return (h, c)


def gru_state(h, c):
    return h


@pytest.fixture
def no_kernel(monkeypatch):
    """Any call into the recurrence fails the test: errors must come before it."""
    def ran(*args, **kwargs):
        raise AssertionError("the recurrence ran on bad input")
    for name in ("lstm", "gru", "lstm_reference", "gru_reference"):
        monkeypatch.setattr(fused_rnn.gated_rnn, name, ran)


def assert_raises_like_torch(call, ref, twin, case):
    want, got = raised_by(lambda: call(ref)), raised_by(lambda: call(twin))
    assert type(got) is type(want) and str(got), (got, want)
    assert case in ATEN_MESSAGES or str(got) == str(want), (got, want)


def bad_call_params(torch_classes, shared, only_first):
    """(module class, case): every shared case ("cx" ones: the LSTM's alone), the first class's
    own ones."""
    return [(c, case) for c in torch_classes for case in shared if c is torch_classes[0] or "cx" not in case] + \
        [(torch_classes[0], case) for case in only_first]


@pytest.mark.parametrize("torch_cls, case", bad_call_params([nn.LSTM, nn.GRU], SEQUENCE_BAD_CALLS, LSTM_ONLY_BAD_CALLS),
                         ids=lambda v: getattr(v, "__name__", v))
def test_sequence_bad_input_raises_what_torch_raises(torch_cls, case, no_kernel):
    config = dict(proj_size=2) if case == "proj hx size" else {}
    state = lstm_state if torch_cls is nn.LSTM else gru_state
    call = LSTM_ONLY_BAD_CALLS.get(case) or (lambda m: SEQUENCE_BAD_CALLS[case](m, state))
    assert_raises_like_torch(call, torch_cls(3, 4, 2, **config), TWIN[torch_cls](3, 4, 2, **config), case)


@pytest.mark.parametrize("torch_cls, case", bad_call_params([nn.LSTMCell, nn.GRUCell], CELL_BAD_CALLS,
                                                            LSTM_CELL_ONLY_BAD_CALLS),
                         ids=lambda v: getattr(v, "__name__", v))
def test_cell_bad_input_raises_what_torch_raises(torch_cls, case, no_kernel):
    state = lstm_state if torch_cls is nn.LSTMCell else gru_state
    call = LSTM_CELL_ONLY_BAD_CALLS.get(case) or (lambda m: CELL_BAD_CALLS[case](m, state))
    assert_raises_like_torch(call, torch_cls(3, 4), TWIN[torch_cls](3, 4), case)


def test_lstm_cell_refuses_a_cell_state_of_another_dtype_which_torch_promotes(no_kernel):
    """A known difference: torch's LSTMCell takes c of another dtype and promotes its results;
    the twin, whose kernels keep one dtype, refuses it."""
    x, hx = h(2, 3), (h(2, 4), h(2, 4, dtype=f64))
    assert all(t.dtype == f64 for t in nn.LSTMCell(3, 4)(x, hx))
    with pytest.raises(RuntimeError, match="hx dtype"):
        LSTMCell(3, 4)(x, hx)


# --- from_torch and convert() --------------------------------------------------------------------


@pytest.mark.parametrize("torch_cls", list(TWIN), ids=lambda c: c.__name__)
def test_from_torch_holds_the_same_parameters(torch_cls):
    sequence = issubclass(torch_cls, nn.RNNBase)
    kw = dict(num_layers=2, bidirectional=True) if sequence else dict(bias=False)
    if torch_cls is nn.LSTM:
        kw["proj_size"] = 2
    ref = torch_cls(4, 3, **kw).double().eval()
    for twin in (TWIN[torch_cls].from_torch(ref, backend="reference"),
                 fused_rnn.gated_rnn.from_torch(ref, backend="reference")):
        assert type(twin) is TWIN[torch_cls] and not twin.training and twin.backend == "reference"
        assert [id(p) for p in twin.parameters()] == [id(p) for p in ref.parameters()]
        assert dict(twin.named_parameters()).keys() == dict(ref.named_parameters()).keys()
        x = probe_input(torch_cls).double()
        for g, w in zip(tensors(twin(x)), tensors(ref(x)), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    other = nn.GRU(4, 3) if sequence and torch_cls is not nn.GRU else nn.LSTM(4, 3) if sequence else nn.RNNCell(4, 3)
    with pytest.raises(TypeError, match=f"takes a torch.nn.{torch_cls.__name__}, got {type(other).__name__}"):
        TWIN[torch_cls].from_torch(other)
    with pytest.raises(TypeError, match="Linear has no fused twin"):
        fused_rnn.gated_rnn.from_torch(nn.Linear(2, 2))


class Encoder(nn.Module):
    """A model holding one of each gated module, a cell held twice."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=3)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.lstm_cell = nn.LSTMCell(5, 5)
        self.gru_cell = nn.GRUCell(5, 5)
        self.again = nn.ModuleList([self.gru_cell])
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        z, h_n = self.gru(y)
        h1, c1 = self.lstm_cell(z[:, -1], (h_n[0], c[-1, :, :5]))
        h2 = self.again[0](self.gru_cell(h1, h1))
        return self.head(h2) + c1.sum(-1, keepdim=True) + h.sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_swaps_lstm_gru_and_cells_keeping_parameters_hooks_and_optimizer(backend):
    device = backend_device(backend)
    torch.manual_seed(0)
    model = Encoder().double().to(device)
    original = copy.deepcopy(model)
    calls = []
    model.gru.register_forward_hook(lambda m, args, out: calls.append("gru"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # made before convert, kept after
    original_opt = torch.optim.SGD(original.parameters(), lr=0.5)
    params = list(model.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left alone
        assert convert(model, backend=backend) is model
    assert [type(m) for m in (model.lstm, model.gru, model.lstm_cell, model.gru_cell)] == \
        [LSTM, GRU, LSTMCell, GRUCell]
    assert model.again[0] is model.gru_cell and model.lstm.backend == backend  # one twin, however shared
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert model.state_dict().keys() == original.state_dict().keys()

    x = rand(3, 5, 4, seed=1, device=device)
    losses = []
    for m, o in ((model, opt), (original, original_opt)):
        o.zero_grad()
        loss = (m(x) ** 2).sum()
        loss.backward()
        losses.append(loss)
    assert calls == ["gru"]  # the hook carried over
    assert rel_err(losses[0], losses[1]) < TOL
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < TOL, name
    opt.step(), original_opt.step()
    for (name, p), q in zip(model.named_parameters(), original.parameters(), strict=True):
        assert rel_err(p, q) < TOL, name


def test_convert_leaves_alone_what_the_twins_cannot_reproduce():
    class MyGRU(nn.GRU):  # a forward of its own: left alone silently unless named
        def forward(self, x, hx=None):
            return super().forward(x.flip(0), hx)

    patched = nn.LSTMCell(3, 4)  # an instance's own forward: the probe sees the difference
    patched.forward = lambda x, hx=None: tuple(2 * t for t in nn.LSTMCell.forward(patched, x, hx))
    reparametrized = nn.LSTM(3, 4)
    parametrize.register_parametrization(reparametrized, "weight_hh_l0", nn.Identity())
    backward_hooked = nn.GRUCell(3, 4)
    backward_hooked.register_full_backward_hook(lambda m, gi, go: None)
    modules = dict(mine=MyGRU(3, 4), patched=patched, reparametrized=reparametrized, hooked=backward_hooked)
    model = nn.ModuleDict(modules)
    with pytest.warns(UserWarning) as record:
        convert(model)
    messages = " | ".join(str(w.message) for w in record)
    assert "left MyGRU alone" not in messages
    assert "left LSTMCell alone: its forward differs from the fused twin's" in messages
    assert "left ParametrizedLSTM alone: it holds parameters, buffers or submodules beyond LSTM's own" in messages
    assert "left GRUCell alone: it has backward hooks" in messages
    assert all(model[name] is module for name, module in modules.items())
    with pytest.warns(UserWarning, match="its class MyGRU overrides forward"):
        convert(model, classes=[nn.GRU])


# --- the ecosystem -------------------------------------------------------------------------------


def test_torch_compile_fullgraph():
    """No graph break on the C++ backend (a graph break would raise); outputs and gradients
    equal the eager twin's."""
    torch._dynamo.reset()
    _, twin = pair(nn.LSTM, "cpu", input_size=3, hidden_size=4, proj_size=2)  # directions: test_nn_rnn.py
    compiled = torch.compile(twin, fullgraph=True)
    x, hx = rand(3, 2, 3, seed=1), (rand(1, 2, 2, seed=2), rand(1, 2, 4, seed=3))
    assert_same(outputs_and_grads(compiled, x, hx), outputs_and_grads(twin, x, hx))


@exhaustive
@pytest.mark.parametrize("torch_cls", [nn.GRU, nn.LSTMCell, nn.GRUCell], ids=lambda c: c.__name__)
def test_torch_compile_fullgraph_of_the_others(torch_cls):
    torch._dynamo.reset()
    sequence = issubclass(torch_cls, nn.RNNBase)
    _, twin = pair(torch_cls, "cpu", input_size=3, hidden_size=4, **(dict(num_layers=2) if sequence else {}))
    compiled = torch.compile(twin, fullgraph=True)
    x = rand(3, 2, 3, seed=1) if sequence else rand(2, 3, seed=1)
    assert_same(outputs_and_grads(compiled, x, None), outputs_and_grads(twin, x, None))


def test_lstm_under_autocast_runs_in_the_autocast_dtype_as_torch_does():
    torch.manual_seed(0)
    ref, twin = nn.LSTM(3, 8, num_layers=2), LSTM(3, 8, num_layers=2, backend="auto")
    twin.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = tensors(twin(x)), tensors(ref(x))
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.bfloat16] * 3
    exact = tensors(twin.double()(x.double()))
    assert all(rel_err(g, e) < 3e-2 for g, e in zip(got, exact))


@exhaustive
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_through_the_lstm(backend):
    """Finite differences through the module: 2 bidirectional projected layers on packed uneven
    sequences, hx given."""
    device = backend_device(backend)
    _, twin = pair(nn.LSTM, backend, input_size=2, hidden_size=3, num_layers=2, bidirectional=True, proj_size=2)
    names = [n for n, _ in twin.named_parameters()]
    lengths = torch.tensor([2, 3, 1])

    def run(x, h0, c0, *params):
        packed_x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h_n, c_n) = torch.func.functional_call(twin, dict(zip(names, params)), (packed_x, (h0, c0)))
        return out.data, h_n, c_n

    inputs = (rand(3, 3, 2, seed=1, device=device), rand(4, 3, 2, seed=2, device=device),
              rand(4, 3, 3, seed=3, device=device), *(p.detach().clone().requires_grad_() for p in twin.parameters()))
    assert torch.autograd.gradcheck(run, inputs, fast_mode=True)
