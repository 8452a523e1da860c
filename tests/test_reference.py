"""The references themselves: the course model and the functional loop agree; the LSTM and GRU
oracles are torch's cells."""
import pytest
import torch
from torch import nn

from conftest import backend_device
from fused_rnn import CharLoopModel, fused_rnn, rnn_reference
from fused_rnn.reference import gru_reference, lstm_reference


def test_char_loop_model_is_the_recurrence():
    device = backend_device("triton")  # where the fused check below runs
    torch.manual_seed(0)
    model = CharLoopModel(vocab_size=13, n_fac=5, n_hidden=24).to(device)
    cs = [torch.randint(0, 13, (6,), device=device) for _ in range(8)]
    x = torch.stack(cs, dim=1)
    args = dict(w_in=model.l_in.weight, b_in=model.l_in.bias, w_h=model.l_hidden.weight,
                b_h=model.l_hidden.bias, embedding=model.e.weight)
    for h_n in (rnn_reference(x, **args)[1], fused_rnn(x, **args, backend="triton")[1]):
        want = torch.log_softmax(model.l_out(h_n), dim=-1)
        torch.testing.assert_close(model(*cs), want, rtol=1e-5, atol=1e-6)


def test_char_loop_model_state_follows_parameters():
    model = CharLoopModel(7, 3, 8).double()
    out = model(torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert out.dtype == torch.float64 and out.shape == (2, 7)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, dtype=torch.float64))


# (kind, nn module options); proj_size is the LSTM's alone
GATED = [(kind, dict(bias=bias)) for kind in ("lstm", "gru") for bias in (True, False)] + [
    ("lstm", dict(bias=True, proj_size=3)), ("lstm", dict(bias=False, proj_size=2))]


@pytest.mark.parametrize("kind, config", GATED,
                         ids=[k + "-" + "-".join(f"{n}={v}" for n, v in c.items()) for k, c in GATED])
def test_gated_references_are_torchs_cells(kind, config):
    """The LSTM and GRU oracles against torch's own modules in float64: outputs, final states and
    the gradients of the input, the initial states and every parameter."""
    torch.manual_seed(0)
    B, T, I, H = 3, 5, 4, 6
    module = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](I, H, batch_first=True, dtype=torch.float64, **config)
    P = config.get("proj_size", 0) or H
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, B, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=True)
    weights = {name: getattr(module, name + "_l0", None) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                                                       "weight_hr")}
    if kind == "lstm":
        want_out, (want_h, want_c) = module(x, (h0, c0))
        out, (h, c) = lstm_reference(x, *(weights[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")),
                                     h0[0], c0[0], weights["weight_hr"])
        got, want = [out, h, c], [want_out, want_h[0], want_c[0]]
    else:
        want_out, want_h = module(x, h0)
        out, h = gru_reference(x, *(weights[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")), h0[0])
        got, want = [out, h], [want_out, want_h[0]]
    leaves = [x, h0] + ([c0] if kind == "lstm" else []) + list(module.parameters())
    g = torch.Generator().manual_seed(1)
    seeds = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in want]
    grads = torch.autograd.grad(sum((a * s).sum() for a, s in zip(got, seeds)), leaves)
    want_grads = torch.autograd.grad(sum((a * s).sum() for a, s in zip(want, seeds)), leaves)
    for a, b in zip(got + list(grads), want + list(want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
