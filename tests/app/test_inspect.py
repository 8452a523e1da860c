"""The numbers behind the pictures of inspect (fused_rnn.app.analysis), and the command end to end."""
import argparse
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_device
from fused_rnn import rnn_reference
from fused_rnn.app.analysis import (char_features, choose_units, gradient_norms, next_char_probs, step_factors,
                                   unit_activations)
from fused_rnn.app.checkpoint import save_checkpoint
from fused_rnn.app.cli import add_inspect_arguments, main
from fused_rnn.app.corpus import encode
from fused_rnn.app.drawings import save_loss_curve
from fused_rnn.app.errors import UserError
from fused_rnn.app.model import CharLanguageModel, ModelConfig
from fused_rnn.app.report import DEFAULT_TEXT, run_inspect

CODE = "def add(a, b):\n    # sum\n    return 'a' + (b * 2)\n\n" * 3


def make_model(num_layers=1, dtype=torch.float64, backend="auto", seed=0):
    """A small random model whose recurrence neither dies out nor saturates at once."""
    torch.manual_seed(seed)
    model = CharLanguageModel(ModelConfig("".join(sorted(set(CODE))), n_fac=5, hidden_size=12,
                                          num_layers=num_layers), backend=backend)
    with torch.no_grad():
        for layer in model.rnn.layers:
            layer.l_hidden.weight *= 3
    return model.to(dtype).eval()


def reference_gradient_norms(model, text, ends, D):
    """||dL_e/dh_{e-k}|| for the last layer, by autograd through rnn_reference run one step at a
    time (each step's state a separate tensor of the graph), in the model's dtype."""
    ids = encode(text, model.config.vocab)
    layers, H = model.rnn.layers, model.config.hidden_size
    h = [torch.zeros(1, H, dtype=model.l_out.weight.dtype) for _ in layers]
    states = []
    for t in range(len(ids)):
        x = ids[None, t:t + 1]
        for i, layer in enumerate(layers):
            x, h[i] = rnn_reference(x, layer.l_in.weight, layer.l_in.bias, layer.l_hidden.weight,
                                    layer.l_hidden.bias, h[i], embedding=layer.e.weight if i == 0 else None)
        states.append(h[-1])
    out = []
    for e in ends:
        loss = F.cross_entropy(model.l_out(states[e]), ids[e + 1:e + 2])
        grads = torch.autograd.grad(loss, [states[e - k] for k in range(D + 1)], retain_graph=True)
        out.append([g.double().norm().item() for g in grads])
    return np.array(out)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradient_norms_match_autograd_through_the_reference(num_layers, backend):
    if backend_device(backend) != "cpu":
        pytest.skip("inspect runs models on the CPU, where the triton backend runs only through "
                    "the interpreter")
    model = make_model(num_layers)
    text, D, ends = CODE[:40], 12, [12, 25, 38]
    if backend == "triton":  # the interpreter is slow: a shorter text
        text, D, ends = CODE[:20], 6, [6, 18]
    want = reference_gradient_norms(model, text, ends, D)
    model.rnn.backend = backend
    got = gradient_norms(model, text, max_distance=D, ends=ends)
    assert list(got["distance"]) == list(range(D + 1)) and list(got["ends"]) == ends
    assert got["norms"].shape == want.shape
    np.testing.assert_allclose(got["norms"], want, rtol=1e-9)
    assert np.ptp(np.log(want)) > 1  # the norms differ (a test on a constant would be weak)


def torch_twin_gradient_norms(model, text, ends, D):
    """||dL_e/ds_{e-k}|| (s = h, or the LSTM's (h, c) together) by autograd through torch's own
    module of the twin's class and weights, run one step at a time."""
    ids = encode(text, model.config.vocab)
    twin = model.rnn
    torch_rnn = type(twin).torch_class(twin.input_size, twin.hidden_size, twin.num_layers, batch_first=True,
                                       dtype=torch.float64)
    torch_rnn.load_state_dict(twin.state_dict())
    x, state, states = model.embedding(ids[None]), None, []
    for t in range(len(ids)):
        _, state = torch_rnn(x[:, t:t + 1], state)
        states.append(state if isinstance(state, tuple) else (state,))
    out = []
    for e in ends:
        loss = F.cross_entropy(model.l_out(states[e][0][-1]), ids[e + 1:e + 2])
        row = []
        for k in range(D + 1):
            grads = torch.autograd.grad(loss, states[e - k], retain_graph=True, allow_unused=True)
            row.append(sum(float((g[-1] ** 2).sum()) for g in grads if g is not None) ** 0.5)
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize("cell,num_layers", [("lstm", 1), ("gru", 2), ("elman", 1)])
def test_gradient_norms_of_torch_cells_match_torch_modules(cell, num_layers):
    """inspect's gradients for a model of a twin cell (train --cell), through the fused backward,
    equal autograd's through torch's own module, the LSTM's state being (h, c)."""
    torch.manual_seed(1)
    config = ModelConfig("".join(sorted(set(CODE))), n_fac=5, hidden_size=9, num_layers=num_layers, cell=cell)
    model = CharLanguageModel(config, backend="cpu").double().eval()
    text, D, ends = CODE[:40], 12, [12, 25, 38]
    want = torch_twin_gradient_norms(model, text, ends, D)
    got = gradient_norms(model, text, max_distance=D, ends=ends)
    np.testing.assert_allclose(got["norms"], want, rtol=1e-9)
    assert np.ptp(np.log(want)) > 1


def test_gradient_norms_in_float32_match_float64_even_when_tiny():
    model64 = make_model()
    with torch.no_grad():  # a contracting recurrence: norms fall far below 1e-19
        model64.rnn.layers[0].l_hidden.weight /= 30
    model32 = make_model().float()
    model32.load_state_dict(model64.state_dict())
    text = CODE[:60]
    want = reference_gradient_norms(model64, text, [50], 24)
    got = gradient_norms(model32, text, max_distance=24, ends=[50])["norms"]
    assert 1e-35 < want[0, -1] < 1e-24  # squares of the fp32 gradient's elements would underflow
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_gradient_norms_default_ends_cover_the_text():
    model = make_model()
    res = gradient_norms(model, CODE[:50], max_distance=20, n_ends=4)  # losses at 20..48
    assert list(res["ends"]) == [20, 29, 39, 48] and res["norms"].shape == (4, 21)
    res = gradient_norms(model, CODE[:50], max_distance=100, n_ends=4)  # capped by the text
    assert list(res["ends"]) == [48] and res["norms"].shape == (1, 49)


def test_activations_and_probabilities_are_the_models_own():
    model = make_model(num_layers=2)
    text = CODE[:30]
    ids = encode(text, model.config.vocab)
    x = ids[None]
    for layer in model.rnn.layers:
        x, _ = rnn_reference(x, layer.l_in.weight, layer.l_in.bias, layer.l_hidden.weight,
                             layer.l_hidden.bias, embedding=layer.e.weight if layer.e is not None else None)
    acts = unit_activations(model, text)
    np.testing.assert_allclose(acts, x[0].detach().numpy(), rtol=0, atol=1e-12)
    probs = next_char_probs(model, text)
    want = torch.softmax(model.l_out(x[0]), -1).detach().numpy()
    np.testing.assert_allclose(probs, want, rtol=0, atol=1e-12)


def test_char_features():
    text = 'if x:\n    s = "a#(b" # c(\n    f(g[1], \'\'\'q\'\'\')\n'
    f = char_features(text)
    marked = lambda name: "".join(c if v else "." for c, v in zip(text, f[name]))  # noqa: E731

    def only(*parts):  # the text with everything but these parts replaced by dots
        out = ["."] * len(text)
        for part in parts:
            i = text.index(part)
            out[i:i + len(part)] = part
        return "".join(out)

    assert marked("inside a string") == only('"a#(b"', "'''q'''")
    assert marked("inside a comment") == only("# c(")
    assert [i for i, v in enumerate(f["in the indentation"]) if v] == [6, 7, 8, 9, 26, 27, 28, 29]
    assert list(f["indentation depth"][:6]) == [0] * 6 and set(f["indentation depth"][6:]) == {4}
    assert list(f["column in the line"][:7]) == [0, 1, 2, 3, 4, 5, 0]
    assert [i for i, v in enumerate(f["is a newline"]) if v] == [i for i, c in enumerate(text) if c == "\n"]
    depth = dict(zip(range(len(text)), f["bracket depth"]))
    assert depth[text.index("f(") + 1] == 1 and depth[text.index("[1") ] == 2
    assert depth[text.index("]")] == 1 and depth[len(text) - 2] == 0
    assert max(f["bracket depth"][:text.index("f(")]) == 0  # brackets in strings and comments do not count


def test_choose_units_finds_a_planted_unit_then_fills_by_variance():
    rng = np.random.default_rng(0)
    n = 300
    in_string = (np.arange(n) % 20 < 7).astype(float)
    acts = rng.normal(0, 0.1, (n, 6))
    acts[:, 4] += in_string  # unit 4 tracks strings
    acts[:, 2] *= 5  # unit 2 varies most among the rest
    units = choose_units(acts, {"inside a string": in_string, "constant": np.ones(n)}, 3)
    assert [u for u, _, _ in units] == [4, 2, units[2][0]] and units[2][0] not in (2, 4)
    assert units[0][1].startswith("inside a string (r = +0.9") and units[1][1].startswith("large variance")
    assert len(choose_units(acts, {}, 10)) == 6  # no more units than the model has


def test_save_loss_curve(tmp_path):
    path = tmp_path / "sub" / "loss.png"
    history = {"step": [1, 2, 3, 4], "train_loss": [4.0, 3.0, 2.5, 2.2], "val": [[2, 3.1], [4, 2.4]]}
    assert save_loss_curve(str(path), history) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib(monkeypatch, checkpoint, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(ImportError, match=r'pip install -e "\.\[viz\]"'):
        save_loss_curve(str(tmp_path / "loss.png"), {"step": [], "train_loss": [], "val": []})
    with pytest.raises(UserError, match=r'inspect needs matplotlib: pip install -e "\.\[viz\]"'):
        run_inspect(parse(["--checkpoint", checkpoint, "--out", str(tmp_path / "out")]))


# ----------------------------------------------------------------------------------------------
# The command, on a tiny model trained here


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    corpus = folder / "corpus.txt"
    corpus.write_text((CODE * 5 + DEFAULT_TEXT) * 3)  # every char of the built-in text
    path = folder / "model.pt"
    assert main(["train", "--corpus", str(corpus), "--seq-len", "16", "--hidden-size", "16", "--n-fac", "6",
                 "--batch-size", "8", "--epochs", "1", "--steps", "20", "--checkpoint", str(path),
                 "--sample-chars", "5"]) == 0
    return str(path)


def parse(argv):
    return add_inspect_arguments(argparse.ArgumentParser()).parse_args(argv)


FILES = ["cell.png", "unrolled.png", "activations.png", "gradients.png", "index.html"]


@pytest.mark.parametrize("source", [[], ["--prime", "def "], ["--text", "CORPUS"]], ids=["default", "prime", "text"])
def test_inspect_writes_every_file(source, checkpoint, tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text(CODE)
    out = tmp_path / "out"
    source = [str(corpus) if a == "CORPUS" else a for a in source]
    assert run_inspect(parse(["--checkpoint", checkpoint, "--out", str(out), "--chars", "120",
                              "--units", "3"] + source)) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / f) for f in FILES]
    for f in FILES[:-1]:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4 and "<p>" in page and 'src="cell.png"' not in page


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "/nonexistent/model.pt"], "not found"),
    (["--checkpoint", "GARBAGE"], "is not a fused_rnn char model"),
    (["--text", "EMPTY"], "is empty"),
    (["--text", "/nonexistent/text.txt"], "cannot read text"),
    (["--text", "ALIEN"], "outside the model's vocabulary: '\\t', 'é'"),
    (["--prime", "déf"], "outside the model's vocabulary: 'é'"),
    (["--prime", ""], "is empty"),
], ids=["missing-checkpoint", "garbage-checkpoint", "empty-text", "missing-text", "unknown-chars",
        "unknown-prime", "empty-prime"])
def test_user_errors_are_one_line(argv, message, checkpoint, tmp_path):
    files = {"GARBAGE": b"not a checkpoint", "EMPTY": b"", "ALIEN": "def\tf(): return 'é'\n".encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    argv = [str(tmp_path / a) if a in files else a for a in argv]
    if "--checkpoint" not in argv:
        argv += ["--checkpoint", checkpoint]
    with pytest.raises(UserError) as exc:
        run_inspect(parse(argv + ["--out", str(tmp_path / "out")]))
    assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_through_the_command_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["inspect", "--checkpoint", checkpoint, "--out", str(out), "--chars", "100", "--units", "2"]) == 0
    assert capsys.readouterr().out.split() == [str(out / f) for f in FILES]
    assert main(["inspect", "--checkpoint", checkpoint, "--prime", "déf"]) == 1
    err = capsys.readouterr().err
    assert "outside the model's vocabulary: 'é'" in err and len(err.strip().splitlines()) == 1, err


def test_inspect_a_two_layer_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = CharLanguageModel(ModelConfig("".join(sorted(set(DEFAULT_TEXT))), n_fac=4, hidden_size=8, num_layers=2))
    path = tmp_path / "two.pt"
    save_checkpoint(str(path), model, 0, float("nan"))
    out = tmp_path / "out"
    assert run_inspect(parse(["--checkpoint", str(path), "--out", str(out), "--chars", "60"])) == 0
    assert "the last of its 2 layers" in (out / "index.html").read_text()


def test_from_course_model_predicts_what_the_course_model_predicts():
    from fused_rnn import CharLoopModel

    torch.manual_seed(0)
    vocab = "".join(sorted(set(CODE)))
    course = CharLoopModel(len(vocab), 5, 12).double()
    model = CharLanguageModel.from_course_model(course, vocab).eval()
    assert model.config == ModelConfig(vocab, n_fac=5, hidden_size=12) and model.l_out.weight.dtype == torch.float64
    x = encode(CODE[:8], vocab)[None].repeat(3, 1)
    logits, _ = model(x)
    want = course(*x.unbind(1))
    torch.testing.assert_close(torch.log_softmax(logits[:, -1], -1), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="the vocabulary has 2 chars"):
        CharLanguageModel.from_course_model(course, "ab")


def test_gradient_norms_past_float64s_range_stay_exact_in_logs():
    """A contracting recurrence whose gradient falls below float64's smallest number: the log norms
    carried back step by step stay finite and keep falling (no underflow to 0, no factor of 1.0
    read off an underflow), and equal the reference's logs where those are representable."""
    model = make_model()
    with torch.no_grad():
        model.rnn.layers[0].l_hidden.weight /= 1000  # ~e^-6 a step
    text, end, D = CODE[:150], 140, 130
    res = gradient_norms(model, text, max_distance=D, ends=[end])
    logs = res["log_norms"][0]
    assert np.isfinite(logs).all() and logs[-1] < np.log(1e-320)  # past float64's range
    factors = step_factors(res)[0]
    assert (factors[-20:] < 0.5).all()  # still contracting at the far end, not 1.0
    want = reference_gradient_norms(model, text, [end], D)[0]
    shown = want > 1e-150  # where the reference's own norm (a sum of squares) cannot underflow
    assert shown.sum() > 20
    np.testing.assert_allclose(logs[shown], np.log(want[shown]), rtol=1e-9, atol=1e-9)
