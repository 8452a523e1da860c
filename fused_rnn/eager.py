"""The fused recurrences' custom ops called without torch.library's dispatch in plain eager code.

A custom op is what torch.compile, torch.export, fake tensors, dispatch modes and torch.func
understand, but every call through one and its autograd rule costs Python dispatch (~0.9 ms
a training step, measured: benchmarks/RESULTS.md), as much as a small recurrence's kernels.
Where none of those mechanisms is active, :func:`with_eager_path` runs the op's own
implementation and autograd rule as a plain ``torch.autograd.Function``: the same kernels,
the same gradients, without the dispatch."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext

_PLAIN = (torch.Tensor, torch.nn.Parameter, str, bool, type(None))


def plain_eager(args) -> bool:
    """Whether a call with ``args`` runs in plain eager PyTorch: no compile or export tracing, no
    jit tracer, no torch.func transform, no forward-mode AD, no dispatch mode, no function mode
    but ``torch.device``'s, and only plain tensors (no subclass, fake tensor or fx proxy)."""
    if (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._len_torch_dispatch_stack() or torch._C._functorch.maybe_current_level() is not None
            or forward_ad._current_level >= 0):
        return False
    if torch._C._is_torch_function_mode_enabled() and not all(
            isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack()):
        return False
    return all(type(a) in _PLAIN for a in args)


def with_eager_path(op, impl, setup_context, backward):
    """``op`` (a custom op with ``backward`` and ``setup_context`` as its autograd rule, ``impl``
    as its implementation), called as a plain ``torch.autograd.Function`` in plain eager code."""
    def forward(ctx, *args):  # ctx first: Function.apply then skips binding args to a signature (~0.1 ms)
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{impl.__name__}_eager", (torch.autograd.Function,),
                    dict(forward=staticmethod(forward), backward=staticmethod(backward)))

    def call(*args):
        return function.apply(*args) if plain_eager(args) else op(*args)
    call.op = op
    return call


def eager_or_op(op, impl):
    """``impl`` in plain eager code, else ``op`` (for a backward op: autograd is not involved)."""
    def call(*args):
        return impl(*args) if plain_eager(args) else op(*args)
    return call
