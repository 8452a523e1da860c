"""convert(): swap modules in a tree for fused twins that compute the same thing.

What can be converted is a table, :data:`CONVERTERS`, one :class:`Converter` per kind of module.
Adding a kind is one call, next to the function that builds its twin::

    register(Converter(
        name="nn.RNN",
        matches=lambda m: isinstance(m, nn.RNN),           # claimed by convert(model) by default
        build=_torch_rnn_twin,  # fused_rnn.RNN.from_torch(m, backend); ValueError when it cannot
        probe_args=lambda m, g: (torch.randn(2, 3, m.input_size, generator=g).to(m.weight_ih_l0),),
    ))

``convert`` swaps a module only when its twin reproduces it: the converter's ``build`` refuses
what it cannot carry (extra submodules, options the twin ignores), and a probe checks that the
twin's forward gives the module's on a small input. Anything left alone gets a warning saying why.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .dispatch import check_backend
from .modules import FusedCharLoopModel
from .reference import CharLoopModel
from .gated_rnn import TWINS, from_torch, torch_rnn_mismatch


@dataclass(frozen=True)
class Converter:
    """One kind of module that :func:`convert` can swap for a fused twin.

    Attributes:
        name: what the warnings call it.
        matches: ``matches(module) -> bool``: whether ``convert(model)`` claims ``module`` by
            default (with ``classes=``, instances of those classes are tried with every converter).
        build: ``build(module, backend) -> twin``: the fused twin, holding the module's own
            parameters where it can (so optimizers keep working). Raises ``ValueError`` saying why
            when the twin would not carry everything the module holds or does.
        probe_args: ``probe_args(module, generator) -> tuple``: a small input for
            ``module.forward`` on its device, drawn from ``generator``, for the probe.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module, str], nn.Module]
    probe_args: Callable[[nn.Module, torch.Generator], tuple]


CONVERTERS: List[Converter] = []


def register(converter: Converter) -> Converter:
    """Adds ``converter`` to the table (tried in the order registered)."""
    CONVERTERS.append(converter)
    return converter


def _course_probe_args(model: nn.Module, g: torch.Generator) -> tuple:
    """Four steps of 3 token ids, one ``[B]`` tensor per step as the course's forward takes."""
    ids = torch.randint(0, model.e.num_embeddings, (4, 3), generator=g).to(model.e.weight.device)
    return tuple(ids)


register(Converter(
    name="CharLoopModel",
    # fused_rnn's class, or a user's copy from the course's notebook (the probe judges it)
    matches=lambda m: isinstance(m, CharLoopModel) or type(m).__name__ == "CharLoopModel",
    build=lambda m, backend: FusedCharLoopModel.from_course_model(m, backend),
    probe_args=_course_probe_args,
))



def _torch_rnn_twin(module: nn.Module, backend: str) -> nn.Module:
    problem = torch_rnn_mismatch(module)
    if problem is not None:
        raise ValueError(problem)
    return from_torch(module, backend)


def _torch_rnn_probe_args(module: nn.Module, g: torch.Generator) -> tuple:
    """Three steps of a batch of 2 for nn.RNN, nn.LSTM and nn.GRU (in their batch_first layout),
    a batch of 2 for their cells; on the module's device, in its dtype."""
    weight = module.weight_ih_l0 if isinstance(module, nn.RNNBase) else module.weight_ih
    shape = (2, module.input_size) if isinstance(module, nn.RNNCellBase) else (3, 2, module.input_size)
    return (torch.randn(shape, generator=g, dtype=torch.float64).to(weight),)


def _is_torch_rnn(module: nn.Module) -> bool:
    """torch's RNN, LSTM, GRU and their cells; not the twins, and not a user's subclass with a
    forward of its own (left alone silently unless named in classes=)."""
    return any(isinstance(module, k) and type(module).forward is k.forward for k in TWINS) \
        and not isinstance(module, tuple(TWINS.values()))


register(Converter(
    name="torch.nn.RNN/LSTM/GRU",
    matches=_is_torch_rnn,
    build=_torch_rnn_twin,
    probe_args=_torch_rnn_probe_args,
))

# Hooks the twin takes over: the same dicts, so the handles the user holds still remove them.
CARRIED_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                 "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
# Backward hooks see the module's inputs and outputs as autograd nodes, which the twin's differ
# from: a module with them is left alone.
REFUSED_HOOKS = ("_backward_hooks", "_backward_pre_hooks")

# Probe tolerance per dtype: the twin matches to that dtype's rounding.
PROBE_TOLERANCE = {torch.float64: (1e-7, 1e-9), torch.float32: (1e-4, 1e-5),
                   torch.bfloat16: (3e-2, 3e-2), torch.float16: (1e-2, 1e-2)}


def convert(model: nn.Module, classes: Optional[Sequence[type]] = None, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every module in ``model``'s tree that a fused twin computes exactly, by
    that twin. Returns ``model``, or the twin when ``model`` itself is replaced.

    Claimed by default: what a registered :class:`Converter` matches: instances of
    :class:`fused_rnn.reference.CharLoopModel`, and of any class named ``CharLoopModel`` (as
    copied from the course's notebook), become :class:`fused_rnn.FusedCharLoopModel`; instances
    of ``torch.nn.RNN``, ``LSTM``, ``GRU``, ``RNNCell``, ``LSTMCell`` and ``GRUCell`` become their
    twins :class:`fused_rnn.RNN`, :class:`fused_rnn.LSTM`, ... (``fused_rnn.gated_rnn.TWINS``).
    With ``classes``, instances of those classes instead.

    A claimed module is replaced only when its twin holds the same parameters (device, dtype,
    training mode and any optimizer holding them carry over), carries its forward and state-dict
    hooks (backward hooks: left alone), and reproduces its forward on a small probe input, with
    its own weights and with random ones (eval mode, no grad; weights, training modes and the RNG
    restored after). Every reference to it in the tree is replaced. A claimed module that fails
    any of this is left alone with a warning saying why.
    """
    check_backend(backend)
    explicit = classes is not None
    classes = tuple(classes) if explicit else ()
    twins = {}  # id(module) -> its twin, or None: each instance is judged once, however shared

    def twin_of(module):
        if id(module) not in twins:
            claimed = isinstance(module, classes) if explicit else any(c.matches(module) for c in CONVERTERS)
            twins[id(module)] = _convert_one(module, explicit, backend) if claimed else None
        return twins[id(module)]

    root = twin_of(model)
    if root is not None:
        return root
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips an instance's second name in one parent
        for name, child in list(parent._modules.items()):
            if child is not None and twin_of(child) is not None:
                setattr(parent, name, twins[id(child)])
    return model


def _convert_one(module: nn.Module, explicit: bool, backend: str) -> Optional[nn.Module]:
    """The twin of a claimed module, or None (after a warning saying why)."""
    hook_problem = _hook_problem(module)
    reasons = [hook_problem] if hook_problem else []
    candidates = CONVERTERS if explicit else [c for c in CONVERTERS if c.matches(module)]
    for converter in [] if hook_problem else candidates:
        try:
            twin = converter.build(module, backend)
            problem = _probe(converter, module, twin)
        except ValueError as exc:
            problem = str(exc)
        if problem is None:
            return _carry_over(module, twin)
        reasons.append(f"as {converter.name}: {problem}" if explicit and len(CONVERTERS) > 1 else problem)
    warnings.warn(f"fused_rnn.convert: left {type(module).__name__} alone: {'; '.join(reasons)}",
                  stacklevel=4)
    return None


def _hook_problem(module: nn.Module) -> Optional[str]:
    if any(getattr(module, name, None) for name in REFUSED_HOOKS):
        return "it has backward hooks, which the fused twin's autograd graph would not call alike"
    return None


def _carry_over(module: nn.Module, twin: nn.Module) -> nn.Module:
    """The module's hooks (the same dicts) and its public plain attributes the twin lacks."""
    for name in CARRIED_HOOKS:
        if hasattr(module, name):
            setattr(twin, name, getattr(module, name))
    for name, value in vars(module).items():
        if not name.startswith("_") and name not in vars(twin) and not hasattr(type(twin), name):
            object.__setattr__(twin, name, value)
    return twin


def _probe(converter: Converter, module: nn.Module, twin: nn.Module) -> Optional[str]:
    """None when ``twin.forward`` reproduces ``module.forward`` on a small input, with the
    module's weights and, if the twin shares them, with random ones; else what differs."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    shared = {id(p) for p in module.parameters()} <= {id(p) for p in twin.parameters()}
    device = tensors[0].device if tensors else torch.device("cpu")
    modes = {m: m.training for m in [*module.modules(), *twin.modules()]}
    saved = [t.data for t in tensors]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            module.eval()
            twin.eval()
            g = torch.Generator().manual_seed(0)
            args = converter.probe_args(module, g)
            for weights in ("its own", "random") if shared else ("its own",):
                if weights == "random":
                    for t in tensors:
                        scale = t.shape[-1] ** -0.5 if t.dim() > 1 else 0.5
                        t.data = (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale).to(t)
                problem = _difference(twin.forward(*args), module.forward(*args))
                if problem is not None:
                    return f"its forward differs from the fused twin's on a probe input with {weights} weights ({problem})"
    except Exception as exc:  # the module's forward, or the twin's, rejects the probe
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"the probe input failed: {type(exc).__name__}: {first}"
    finally:
        for t, data in zip(tensors, saved):
            t.data = data
        for m, training in modes.items():
            m.training = training
    return None


def _difference(got, want) -> Optional[str]:
    """None when ``got`` matches ``want`` (same structure; tensors close for their dtype)."""
    got_leaves, got_spec = tree_flatten(got)
    want_leaves, want_spec = tree_flatten(want)
    if got_spec != want_spec:
        return f"output structure {got_spec} instead of {want_spec}"
    for g, w in zip(got_leaves, want_leaves):
        if not isinstance(w, torch.Tensor):
            if g != w:
                return f"{g!r} instead of {w!r}"
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            return "outputs of another shape or dtype"
        rtol, atol = PROBE_TOLERANCE.get(w.dtype, (0, 0))
        if not torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True):
            return f"max difference {(g.double() - w.double()).abs().max().item():.3g}"
    return None
