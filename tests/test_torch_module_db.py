"""fused_rnn's twins of torch's recurrent modules on PyTorch's own module test inputs: every sample
that ``torch.testing._internal.common_modules.module_db`` holds for ``nn.RNN``, ``nn.LSTM``,
``nn.GRU``, ``nn.RNNCell``, ``nn.LSTMCell`` and ``nn.GRUCell``.

Per sample, float64: the twin built from the same constructor arguments and loaded with torch's
state dict gives torch's outputs (final states included) and the same gradients of every input and
parameter, to 1e-10 relative; per error sample, the twin raises torch's exception type (and a
message torch's own regex accepts). Per module class: state_dict both ways, pickle, deepcopy,
``.double()``/``.to(float64)`` (swapping too), ``torch.func.functional_call``, non-contiguous
inputs, factory kwargs, the meta device and ``to_empty``; double backward (gradgradcheck over the
parameters). What torch's own module tests check and this file does not: ``NOT_COVERED``.
"""
import copy
import pickle
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fused_rnn
from conftest import backend_device, exhaustive
from helpers import rel_err

f64 = torch.float64
TOL = 1e-10

# What torch's TestModule (test/test_modules.py) checks on these samples and this file does not.
NOT_COVERED = {
    "test_grad (finite differences)": "gradients are compared with torch's here; gradcheck: test_nn_rnn.py",
    "test_cpu_gpu_parity, test_multiple_device_transfer": "need a GPU",
    "test_memory_format": "no 4-D/5-D inputs here; outputs' contiguity: test_nn_rnn.py",
    "samples in float32, float16, bfloat16": "float64 only; other dtypes: test_parity.py, test_nn_rnn.py",
}


def _global_state():
    return torch.get_default_dtype(), torch.backends.flags_frozen()


def _import_common_modules():
    """torch's module test inputs, or a skip saying why (they need e.g. ``expecttest``). The import
    freezes torch.backends' global flags (a later plain ``torch.backends.cudnn.x = ...`` raises)
    and could change the default dtype: both are restored for the tests that run after it."""
    dtype, frozen = _global_state()
    try:
        return pytest.importorskip("torch.testing._internal.common_modules")
    finally:
        torch.set_default_dtype(dtype)
        if not frozen:  # no public way back: the flag that disable_global_flags() cleared
            torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True


STATE_BEFORE_IMPORT = _global_state()
common_modules = _import_common_modules()
ModuleErrorEnum = common_modules.ModuleErrorEnum

TWINS = {nn.RNN: fused_rnn.RNN, nn.RNNCell: fused_rnn.RNNCell, nn.LSTM: fused_rnn.LSTM,
         nn.LSTMCell: fused_rnn.LSTMCell, nn.GRU: fused_rnn.GRU, nn.GRUCell: fused_rnn.GRUCell}
INFOS = [info for info in common_modules.module_db if info.module_cls in TWINS]


# --- the samples, generically ------------------------------------------------------------------


def samples(info, device, training=True):
    torch.manual_seed(0)  # make_tensor draws from the global generator
    return list(info.module_inputs_func(info, device=device, dtype=f64, requires_grad=True,
                                        training=training))


def error_samples(info, device):
    if info.module_error_inputs_func is None:
        return []
    torch.manual_seed(0)
    return list(info.module_error_inputs_func(info, device=device, dtype=f64, requires_grad=False,
                                              training=True))


def _fmt(value):
    if isinstance(value, PackedSequence):
        return f"packed{_fmt(value.data)}"
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape)) or "scalar"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(map(_fmt, value)) + ")"
    return repr(value)  # '10' apart from 10


def _call(function_input):
    return ",".join([_fmt(a) for a in function_input.args]
                    + [f"{k}={_fmt(v)}" for k, v in function_input.kwargs.items()])


def sample_id(info, sample):
    """``RNN(input_size=2,...,nonlinearity=relu)(3x2,4x3)``: constructor, then input shapes."""
    text = f"{info.module_cls.__name__}({_call(sample.constructor_input)})"
    if sample.forward_input is not None:
        text += f"({_call(sample.forward_input)})"
    return text + (f"[{sample.desc}]" if sample.desc else "")


def _params(backends, per_info, fast):
    """pytest params ``(backend, info, index, *extra)`` for every sample of every info;
    ``fast(backend, info, index, *extra)`` says which stay in the fast tier."""
    params = []
    for backend in backends:
        for info in INFOS:
            for index, sample, extra, suffix in per_info(info):
                marks = () if fast(backend, info, index, *extra) else exhaustive
                params.append(pytest.param(backend, info, index, *extra, marks=marks,
                                           id=f"{backend}-{sample_id(info, sample)}{suffix}"))
    return params


def _richest(info):
    """The index of the sample whose module holds the most parameter tensors (biases, both
    directions), then takes the most inputs: the fast tier's one sample per module class."""
    listed = samples(info, "cpu")

    def size(index):
        args, kwargs = listed[index].constructor_input.args, listed[index].constructor_input.kwargs
        return len(list(info.module_cls(*args, **kwargs).parameters())), len(listed[index].forward_input.args)
    return max(range(len(listed)), key=size)


RICHEST = {info.module_cls: _richest(info) for info in INFOS}


def _forward_samples(info):
    # Modules whose train and eval modes differ run in both (the eval one in the exhaustive tier).
    modes = (True, False) if info.train_and_eval_differ else (True,)
    listed = samples(info, "cpu")
    return [(index, sample, (training,), "" if len(modes) == 1 else ("-train" if training else "-eval"))
            for training in modes for index, sample in enumerate(listed)]


def _error_samples(info):
    return [(index, sample.module_error_input, (), "") for index, sample in
            enumerate(error_samples(info, "cpu"))]


def _class_samples(info):
    return [(index, sample, (), "") for index, sample in enumerate(samples(info, "cpu"))]


def build(info, sample, backend, device, dtype=f64):
    """torch's module and the twin from the sample's constructor arguments, the twin holding
    torch's state dict, both on ``device`` in ``dtype`` (as torch's TestModule builds them)."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(0)
    ref = info.module_cls(*args, **kwargs).to(device).to(dtype)
    twin = TWINS[info.module_cls](*args, **kwargs, backend=backend).to(device).to(dtype)
    twin.load_state_dict(ref.state_dict())
    return ref, twin


# --- running a sample ----------------------------------------------------------------------------


def _tensors(value):
    """The tensors in a forward input or output, in order (a PackedSequence by its data)."""
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def outputs_and_grads(module, function_input, params=None, call=None):
    """{name: tensor}: every output of ``module`` on the sample's forward input, and the
    gradients of every input that requires grad and of every parameter (``params``: the
    parameters by name, default the module's own) under seeded random output gradients."""
    torch.manual_seed(1)  # the same dropout draws in both modules, were there dropout
    out = (call or module)(*function_input.args, **function_input.kwargs)
    outputs = _tensors(out)
    g = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in outputs)
    inputs = [t for t in _tensors((function_input.args, function_input.kwargs)) if t.requires_grad]
    params = dict(module.named_parameters()) if params is None else params
    wrt = inputs + list(params.values())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else []
    result = {f"output{i}": o for i, o in enumerate(outputs)}
    result.update({f"grad_input{i}": g for i, g in enumerate(grads[:len(inputs)])})
    result.update({f"grad_{name}": g for name, g in zip(params, grads[len(inputs):])})
    return result


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert (g is None) == (w is None), name
        if w is None:
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        if w.numel():
            assert rel_err(g, w) < TOL, f"{name}: relative error {rel_err(g, w):.1e}"


def raised_by(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


# --- the tests -----------------------------------------------------------------------------------


def test_importing_torch_test_inputs_left_global_state_alone():
    assert _global_state() == STATE_BEFORE_IMPORT


def test_module_db_has_every_twin():
    assert {info.module_cls for info in INFOS} == set(TWINS)
    assert all(samples(info, "cpu") for info in INFOS)


# Every sample on the C++ and reference backends; the Triton interpreter (slow) on the richest
# sample of each module class, the rest in the exhaustive tier.
@pytest.mark.parametrize("backend, info, index, training", _params(
    ["cpu", "reference", "triton"], _forward_samples,
    fast=lambda backend, info, index, training: training and (
        backend != "triton" or index == RICHEST[info.module_cls])))
def test_sample_matches_torch(backend, info, index, training):
    device = backend_device(backend)
    sample = samples(info, device, training)[index]
    ref, twin = build(info, sample, backend, device)
    ref.train(training), twin.train(training)
    got = outputs_and_grads(twin, sample.forward_input)
    assert_same(got, outputs_and_grads(ref, sample.forward_input))
    if sample.reference_fn is not None:  # torch's own check: unbatched input as a batch of one
        fwd = sample.forward_input
        with torch.no_grad():
            want = _tensors(sample.reference_fn(twin, *fwd.args, **fwd.kwargs))
        for i, w in enumerate(want):
            assert got[f"output{i}"].shape == w.shape and rel_err(got[f"output{i}"], w) < TOL


# Errors come before any kernel runs: cheap on every backend.
@pytest.mark.parametrize("backend, info, index", _params(
    ["cpu", "reference", "triton"], _error_samples, fast=lambda *_: True))
def test_error_sample_raises_what_torch_raises(backend, info, index):
    device = backend_device(backend)
    error = error_samples(info, device)[index]
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    twin_cls = TWINS[info.module_cls]
    if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        want = raised_by(lambda: info.module_cls(*args, **kwargs))
        got = raised_by(lambda: twin_cls(*args, **kwargs, backend=backend))
    else:  # built as torch's TestModule.test_errors builds it: default dtype, default device
        ref, twin = info.module_cls(*args, **kwargs), twin_cls(*args, **kwargs, backend=backend)
        fwd = sample.forward_input
        want = raised_by(lambda: ref(*fwd.args, **fwd.kwargs))
        got = raised_by(lambda: twin(*fwd.args, **fwd.kwargs))
    assert isinstance(want, error.error_type) and re.search(error.error_regex, str(want)), want
    assert type(got) is type(want), (got, want)
    assert re.search(error.error_regex, str(got)), f"{got!r} does not match torch's {error.error_regex!r}"


# Per module class: the richest sample in the fast tier, every sample in the exhaustive one.
CLASS_PARAMS = _params(["cpu"], _class_samples, fast=lambda backend, info, index: index == RICHEST[info.module_cls])


@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_state_dict_round_trips_both_ways(backend, info, index):
    device = backend_device(backend)
    sample = samples(info, device)[index]
    ref, twin = build(info, sample, backend, device)
    assert repr(twin) == repr(ref)
    assert twin.state_dict().keys() == ref.state_dict().keys()
    ref2, twin2 = build(info, sample, backend, device)
    with torch.no_grad():  # make them differ first, so that loading has something to do
        for p in [*ref2.parameters(), *twin2.parameters()]:
            p.uniform_(-0.1, 0.1)
    twin2.load_state_dict(ref.state_dict(), strict=True)
    ref2.load_state_dict(twin.state_dict(), strict=True)
    for name, value in ref.state_dict().items():
        assert torch.equal(twin2.state_dict()[name], value) and torch.equal(ref2.state_dict()[name], value)
    want = outputs_and_grads(ref, sample.forward_input)
    assert_same(outputs_and_grads(twin2, sample.forward_input), want)
    assert_same(outputs_and_grads(ref2, sample.forward_input), want)


@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_pickle_and_deepcopy_give_the_same_outputs(backend, info, index):
    device = backend_device(backend)
    sample = samples(info, device)[index]
    _, twin = build(info, sample, backend, device)
    want = outputs_and_grads(twin, sample.forward_input)
    for copied in (pickle.loads(pickle.dumps(twin)), copy.deepcopy(twin)):
        assert type(copied) is type(twin) and copied.backend == backend
        assert all(a is not b for a, b in zip(copied.parameters(), twin.parameters(), strict=True))
        assert_same(outputs_and_grads(copied, sample.forward_input), want)


def _to_swapping(module):
    """``.to(float64)`` swapping the parameters' contents in place (torch's test_to)."""
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        return module.to(f64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to(f64), _to_swapping],
                         ids=["double", "to", "to-swap"])
@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_float32_module_converted_to_float64(backend, info, index, convert):
    device = backend_device(backend)
    sample = samples(info, device)[index]
    ref, twin = build(info, sample, backend, device, dtype=torch.float32)
    before = list(twin.parameters())
    ref, twin = convert(ref), convert(twin)
    if convert is _to_swapping:
        assert all(a is b for a, b in zip(twin.parameters(), before, strict=True))
    assert all(p.dtype == f64 for p in twin.parameters())
    if isinstance(twin, nn.RNNBase):
        assert all(w.dtype == f64 for w in twin._flat_weights)  # what forward reads
    assert_same(outputs_and_grads(twin, sample.forward_input), outputs_and_grads(ref, sample.forward_input))


@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_functional_call(backend, info, index):
    device = backend_device(backend)
    sample = samples(info, device)[index]
    ref, twin = build(info, sample, backend, device)
    params = {name: p.detach().clone().requires_grad_() for name, p in ref.named_parameters()}
    with torch.no_grad():  # the module's own parameters must not be read
        for p in twin.parameters():
            p.fill_(float("nan"))

    def call(module):
        return lambda *args, **kwargs: torch.func.functional_call(module, params, args, kwargs)

    got = outputs_and_grads(twin, sample.forward_input, params, call(twin))
    assert_same(got, outputs_and_grads(ref, sample.forward_input, params, call(ref)))


def _non_contiguous(value):
    """The same values, non-contiguous (torch's TestModule.test_non_contiguous_tensors)."""
    if isinstance(value, torch.Tensor) and value.dim():
        return torch.repeat_interleave(value, 2, dim=-1)[..., ::2].detach().requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(map(_non_contiguous, value))
    if isinstance(value, dict):
        return {k: _non_contiguous(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_non_contiguous_inputs(backend, info, index):
    device = backend_device(backend)
    sample = samples(info, device)[index]
    ref, twin = build(info, sample, backend, device)
    fwd = sample.forward_input
    strided = common_modules.FunctionInput(*_non_contiguous(fwd.args), **_non_contiguous(fwd.kwargs))
    assert not any(t.is_contiguous() for t in _tensors((strided.args, strided.kwargs)))
    assert_same(outputs_and_grads(twin, strided), outputs_and_grads(ref, fwd))


@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_factory_kwargs_and_meta_device(backend, info, index):
    """torch's test_factory_kwargs and test_device_ctx_init: parameters made where and as asked."""
    device = backend_device(backend)
    sample = samples(info, device)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    twin = TWINS[info.module_cls](*args, **kwargs, device=device, dtype=f64, backend=backend)
    assert all(p.dtype == f64 and p.device.type == torch.device(device).type for p in twin.parameters())
    ref = info.module_cls(*args, **kwargs)
    with torch.device("meta"):
        twin = TWINS[info.module_cls](*args, **kwargs, backend=backend)
    assert [(n, p.shape, p.dtype, p.is_meta) for n, p in twin.named_parameters()] == \
        [(n, p.shape, p.dtype, True) for n, p in ref.named_parameters()]


@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_to_empty_from_meta_then_load_state_dict(backend, info, index):
    """Built on the meta device, materialised with ``to_empty``, loaded: torch's results."""
    device = backend_device(backend)
    sample = samples(info, device)[index]
    ref, _ = build(info, sample, backend, device)
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    with torch.device("meta"):
        twin = TWINS[info.module_cls](*args, **kwargs, dtype=f64, backend=backend)
    twin = twin.to_empty(device=device)
    twin.load_state_dict(ref.state_dict())
    assert_same(outputs_and_grads(twin, sample.forward_input), outputs_and_grads(ref, sample.forward_input))


@pytest.mark.parametrize("backend, info, index", [p for p in CLASS_PARAMS if not p.values[1].train_and_eval_differ])
def test_forward_does_not_read_training_where_torch_says_modes_agree(backend, info, index):
    """torch's test_if_train_and_eval_modes_differ: without ``train_and_eval_differ`` (the cells)
    the forward must not read ``training``."""
    device = backend_device(backend)
    sample = samples(info, device)[index]
    _, twin = build(info, sample, backend, device)
    delattr(twin, "training")
    twin(*sample.forward_input.args, **sample.forward_input.kwargs)


# torch's test_gradgrad, over the parameters: the richest sample per class on the C++ backend in
# the fast tier, every sample in the exhaustive one. The Triton interpreter's double backward is
# the same recomputation (test_edges.py runs it through both twins).
@pytest.mark.parametrize("backend, info, index", CLASS_PARAMS)
def test_double_backward(backend, info, index):
    device = backend_device(backend)
    sample = samples(info, device)[index]
    _, twin = build(info, sample, backend, device)
    names = [name for name, _ in twin.named_parameters()]
    fwd = sample.forward_input

    def run(*params):
        return tuple(_tensors(torch.func.functional_call(twin, dict(zip(names, params)), fwd.args, fwd.kwargs)))

    params = [p.detach().clone().requires_grad_() for p in twin.parameters()]
    assert torch.autograd.gradgradcheck(run, params)
