"""The plain eager path (fused_rnn/eager.py): in plain eager code the recurrences run as a plain
torch.autograd.Function on the custom ops' own implementation, bit for bit what the ops give;
wherever torch's tracing and transform machinery is active they run as the custom ops."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_rnn
import fused_rnn.eager as eager
from helpers import make_problem, run_with_grads


def _node(output) -> str:
    """The class name of the autograd node that made the states behind ``output``."""
    node = output.grad_fn
    while node is not None and type(node).__name__.startswith(("Transpose", "Select")):
        node = node.next_functions[0][0]
    return type(node).__name__


def _dense(seed=0, G=1, H=5, I=4):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()

    return dict(x=rand(3, 4, I), w_ih=rand(G * H, I), w_hh=rand(G * H, H), b_ih=rand(G * H), b_hh=rand(G * H),
                h0=rand(3, H))


def _lstm(**a):
    output, (h_n, c_n) = fused_rnn.lstm(**a)
    return output, h_n + c_n


CALLS = {  # name: (function of the keyword arguments, the arguments)
    "course tokens": (fused_rnn.fused_rnn, lambda: make_problem(3, 4, 5, dtype=torch.float64)),
    "course dense": (fused_rnn.fused_rnn, lambda: make_problem(3, 4, 5, tokens=False, dtype=torch.float64)),
    "elman": (fused_rnn.elman_rnn, _dense),
    "lstm": (_lstm, lambda: _dense(G=4)),
    "gru": (fused_rnn.gru, lambda: _dense(G=3)),
}


@pytest.mark.parametrize("name", CALLS)
def test_plain_eager_path_gives_the_custom_ops_bits(monkeypatch, name):
    function, make = CALLS[name]
    args = make()
    eager_run = run_with_grads(lambda **a: function(**a, backend="cpu"), args)
    monkeypatch.setattr(eager, "plain_eager", lambda args: False)
    op_run = run_with_grads(lambda **a: function(**a, backend="cpu"), args)
    assert eager_run.keys() == op_run.keys()
    for key in op_run:
        assert torch.equal(eager_run[key], op_run[key]), key


def test_plain_eager_code_skips_the_op_dispatch():
    args = make_problem(2, 3, 4)
    output, _ = fused_rnn.fused_rnn(**args, backend="cpu")
    assert _node(output).endswith("_eagerBackward")
    with torch.device("cpu"):  # a function mode of its own that changes nothing here
        output, _ = fused_rnn.fused_rnn(**args, backend="cpu")
    assert _node(output).endswith("_eagerBackward")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["course tokens", "lstm"])
def test_a_dispatch_mode_sees_the_custom_ops_forward_and_backward(name):
    function, make = CALLS[name]
    args = make()
    with _OpLog() as log:
        run_with_grads(lambda **a: function(**a, backend="cpu"), args)
    fused = [op for op in log.ops if op.startswith("fused_rnn.")]
    assert len(fused) == 2 and fused[1].split(".")[1].endswith("_backward"), fused


class _Subclass(torch.Tensor):
    pass


def test_plain_eager_says_no_under_each_mechanism_that_needs_the_op():
    t = torch.ones(2)
    assert eager.plain_eager((t, torch.nn.Parameter(t), None, "cpu", False))
    assert not eager.plain_eager((t, object()))  # anything but plain tensors, None, str and bool (an fx proxy)
    assert not eager.plain_eager((t.as_subclass(_Subclass),))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not eager.plain_eager((t,))
    assert torch.vmap(lambda v: torch.tensor(eager.plain_eager((v,))))(torch.ones(3, 2)).sum() == 0
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        assert not eager.plain_eager((t,))
    from torch.overrides import TorchFunctionMode

    class Mode(TorchFunctionMode):
        pass

    with Mode():
        assert not eager.plain_eager((t,))
    assert torch.compile(lambda v: v + eager.plain_eager((v,)), backend="eager", fullgraph=True)(t).eq(1).all()
