"""FusedCharLoopModel, convert(), FusedRNN, and padded batches (lengths)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_rnn
from fused_rnn import FusedCharLoopModel, FusedRNN, convert, fused_rnn as rnn, rnn_reference
from fused_rnn.reference import CharLoopModel as CourseModel
from conftest import backend_device
from helpers import make_problem, rel_err


class CharLoopModel(nn.Module):
    """A user's own copy of the course model, as written in the notebook (not fused_rnn's class)."""

    def __init__(self, vocab_size, n_fac, n_hidden):
        super().__init__()
        self.e = nn.Embedding(vocab_size, n_fac)
        self.l_in = nn.Linear(n_fac, n_hidden)
        self.l_hidden = nn.Linear(n_hidden, n_hidden)
        self.l_out = nn.Linear(n_hidden, vocab_size)

    def forward(self, *cs):
        bs = cs[0].size(0)
        h = torch.zeros(bs, self.l_hidden.in_features)
        for c in cs:
            inp = F.relu(self.l_in(self.e(c)))
            h = torch.tanh(self.l_hidden(h + inp))
        return F.log_softmax(self.l_out(h), dim=-1)


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.head = nn.Linear(3, 3)


def chars(B=6, T=8, V=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B,), generator=g) for _ in range(T)]


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_fused_char_loop_model_matches_the_course_model(backend):
    device = backend_device(backend)
    torch.manual_seed(0)
    course = CourseModel(20, 7, 32).to(device)
    fused = FusedCharLoopModel(20, 7, 32, backend=backend).to(device)
    fused.load_state_dict(course.state_dict(), strict=True)
    course.load_state_dict(fused.state_dict(), strict=True)
    cs = [c.to(device) for c in chars()]
    want = course(*cs)
    torch.testing.assert_close(fused(*cs), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused(torch.stack(cs, 1)), want, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(fused(*cs).sum(), list(fused.parameters()))
    want_grads = torch.autograd.grad(want.sum(), list(course.parameters()))
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < 1e-5


def test_convert_replaces_user_models_in_a_tree_and_keeps_everything():
    torch.manual_seed(0)
    model = Wrapper(CharLoopModel(20, 7, 32)).double().eval()
    original = copy.deepcopy(model)
    params = {id(p) for p in model.inner.parameters()}
    out = convert(model)
    assert out is model and isinstance(model.inner, FusedCharLoopModel)
    assert {id(p) for p in model.inner.parameters()} == params  # optimizers keep working
    assert not model.inner.training and model.inner.l_hidden.weight.dtype == torch.float64
    cs = chars()
    with torch.no_grad():
        torch.testing.assert_close(model.inner(*cs), original.inner(*cs))
    assert model.state_dict().keys() == original.state_dict().keys()


def test_convert_the_root_and_the_library_class():
    converted = convert(CourseModel(10, 3, 8))
    assert isinstance(converted, FusedCharLoopModel)


def test_convert_leaves_non_matching_models_alone():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 3)
            self.l_in = nn.Linear(3, 8)
            self.l_hidden = nn.Linear(8, 8)
            self.l_out = nn.Linear(8, 11)  # does not predict the vocabulary

    tree = nn.Sequential(Other(), nn.Linear(2, 2))
    assert isinstance(convert(tree)[0], Other)  # not named CharLoopModel: silently left alone
    with pytest.warns(UserWarning, match="l_out.out_features != e.num_embeddings"):
        assert isinstance(convert(tree, classes=[Other])[0], Other)


def test_converted_user_model_trains_step_for_step_like_the_original():
    """30 Adam steps on real text: the losses stay within 1e-3 relative of the original's."""
    text = open(fused_rnn.reference.__file__).read() + open(fused_rnn.function.__file__).read()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    torch.manual_seed(0)
    original = CharLoopModel(len(vocab), 42, 64)
    fused = convert(copy.deepcopy(original))
    assert isinstance(fused, FusedCharLoopModel)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (original, fused)]
    g = torch.Generator().manual_seed(1)
    first = None
    for step in range(30):
        starts = torch.randint(0, len(data) - 9, (64,), generator=g)
        window = data[starts[:, None] + torch.arange(9)]
        cs, y = [window[:, i] for i in range(8)], window[:, 8]
        losses = []
        for model, opt in zip((original, fused), opts):
            loss = F.nll_loss(model(*cs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-3 * abs(losses[0]), (step, losses)
        first = first or losses[0]
    assert losses[0] < first - 0.5  # it learned something


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("batch_first", [True, False])
def test_fused_rnn_module_stacks_layers(layers, batch_first):
    torch.manual_seed(0)
    m = FusedRNN(5, 12, num_layers=layers, batch_first=batch_first)
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    h0 = torch.randn(layers, 4, 12)
    out, h_n = m(x, h0)
    assert out.shape == x.shape[:2] + (12,) and h_n.shape == (layers, 4, 12)
    inp = x if batch_first else x.transpose(0, 1)
    for i, layer in enumerate(m.layers):
        inp, h = rnn_reference(inp, layer.l_in.weight, layer.l_in.bias, layer.l_hidden.weight,
                               layer.l_hidden.bias, h0[i])
        torch.testing.assert_close(h_n[i], h)
    torch.testing.assert_close(out, inp if batch_first else inp.transpose(0, 1))


def test_fused_rnn_module_token_input():
    m = FusedRNN(6, 10, vocab_size=15)
    out, h_n = m(torch.randint(0, 15, (3, 7)))
    assert out.shape == (3, 7, 10) and h_n.shape == (1, 3, 10)
    with pytest.raises(ValueError, match="num_layers"):
        FusedRNN(6, 10, num_layers=0)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
def test_lengths_match_running_each_sequence_alone(backend, tokens):
    B, T, H = 4, 9, 16
    device = backend_device(backend)
    args = make_problem(B, T, H, tokens=tokens, dtype=torch.float64, device=device)
    lengths = torch.tensor([9, 1, 5, 7], device=device)
    out, h_n = rnn(**args, lengths=lengths, backend=backend)
    g = torch.Generator().manual_seed(3)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype).to(device)
    gh = torch.randn(h_n.shape, generator=g, dtype=out.dtype).to(device)
    floats = {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad((out * go).sum() + (h_n * gh).sum(), list(floats.values()))

    want_loss = 0
    for b in range(B):
        n = int(lengths[b])
        alone = dict(args, x=args["x"][b:b + 1, :n], h0=args["h0"][b:b + 1])
        o, h = rnn_reference(**alone)
        torch.testing.assert_close(out[b, :n], o[0])
        assert out[b, n:].abs().max() == 0 if n < T else True
        torch.testing.assert_close(h_n[b], h[0])
        want_loss = want_loss + (o[0] * go[b, :n]).sum() + (h[0] * gh[b]).sum()
    want = torch.autograd.grad(want_loss, list(floats.values()), allow_unused=True)
    for name, g_, w in zip(floats, grads, want):
        w = torch.zeros_like(g_) if w is None else w
        torch.testing.assert_close(g_, w, msg=name)


def test_bad_lengths():
    args = make_problem(3, 5, 8)
    with pytest.raises(ValueError, match=r"\[1, T=5\]"):
        rnn(**args, lengths=torch.tensor([5, 0, 2]))
    with pytest.raises(ValueError, match=r"\[1, T=5\]"):
        rnn(**args, lengths=torch.tensor([6, 1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        rnn(**args, lengths=torch.tensor([5, 1]))
    with pytest.raises(TypeError, match="integer"):
        rnn(**args, lengths=torch.tensor([5.0, 1.0, 2.0]))


def test_modules_take_lengths():
    torch.manual_seed(0)
    lengths = torch.tensor([6, 2, 4])
    x = torch.randint(0, 15, (3, 6))
    rnn_module = FusedRNN(6, 10, num_layers=2, vocab_size=15)
    out, h_n = rnn_module(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone_out, alone_h = rnn_module(x[b:b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone_out[0])
        torch.testing.assert_close(h_n[:, b], alone_h[:, 0])
    char_model = FusedCharLoopModel(15, 4, 8)
    scores = char_model(x, lengths=lengths)
    torch.testing.assert_close(scores[1], char_model(x[1:2, :2])[0])
