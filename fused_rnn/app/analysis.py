"""The numbers of ``inspect``: states, next-char probabilities, telling units, gradient norms.

Plain functions of a model and a text, checked by the tests against the reference loop; the
drawings only turn them into pictures. Only the last recurrent layer is inspected: it is the one
the output layer reads.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import describe_chars, encode, unknown_chars
from .errors import UserError
from .model import CharLanguageModel


def encode_text(model: CharLanguageModel, text: str) -> torch.Tensor:
    """Token ids ``[N]`` of ``text``; UserError if it is empty or has chars outside the vocabulary."""
    if not text:
        raise UserError("the text to inspect is empty")
    check_vocabulary(model, text)
    if len(text) < 2:
        raise UserError("the text to inspect needs at least 2 characters (one to read, one to predict)")
    return encode(text, model.config.vocab)


def check_vocabulary(model: CharLanguageModel, text: str, what: str = "the text"):
    """UserError naming the chars of ``text`` that the model does not know."""
    unknown = unknown_chars(text, model.config.vocab)
    if unknown:
        raise UserError(f"{what} has {len(unknown)} character(s) outside the model's vocabulary: "
                        f"{describe_chars(unknown)}")


def _last_layer_input(model, ids):
    """What the last recurrent layer reads: the token ids ``[1, N]`` for a one-layer model, else
    the states ``[1, N, H]`` of the layer below."""
    x = ids[None]
    with torch.no_grad():
        for layer in model.rnn.layers[:-1]:
            x, _ = layer(x, None, None, model.rnn.backend)
    return x


@torch.no_grad()
def unit_activations(model: CharLanguageModel, text: str) -> np.ndarray:
    """``[N, H]``: the last layer's state ``h_t`` after reading each char of ``text`` (from ``h_0 = 0``)."""
    model.eval()
    ids = encode_text(model, text)[None]
    output, _ = model.rnn(ids if model.embedding is None else model.embedding(ids))
    return output[0].double().numpy()


@torch.no_grad()
def next_char_probs(model: CharLanguageModel, text: str) -> np.ndarray:
    """``[N, V]``: the model's probabilities for the char after each char of ``text``."""
    model.eval()
    logits, _ = model(encode_text(model, text)[None])
    return torch.softmax(logits[0].double(), dim=-1).numpy()


def char_features(text: str) -> dict:
    """Simple per-char facts about Python-like text, ``{name: float array [N]}``, to find units
    that track them: inside a string (quotes included), inside a comment, in a line's leading
    spaces, the line's indentation depth (in spaces), bracket depth, column, and "is a newline"."""
    n = len(text)
    f = {k: np.zeros(n) for k in ("inside a string", "inside a comment", "in the indentation",
                                  "indentation depth", "bracket depth", "column in the line",
                                  "is a newline")}
    quote, comment, escaped, depth, i = None, False, False, 0, 0
    while i < n:  # strings, comments and brackets
        c, i0 = text[i], i
        if quote is not None:
            f["inside a string"][i] = 1
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif text.startswith(quote, i):
                f["inside a string"][i:i + len(quote)] = 1
                i += len(quote) - 1
                quote = None
            elif c == "\n" and len(quote) == 1:
                quote = None  # an unterminated one-line string
        elif comment:
            f["inside a comment"][i] = c != "\n"
            comment = c != "\n"
        elif c in "'\"":
            quote = c * 3 if text.startswith(c * 3, i) else c
            f["inside a string"][i:i + len(quote)] = 1
            i += len(quote) - 1
        elif c == "#":
            comment = True
            f["inside a comment"][i] = 1
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(depth - 1, 0)
        f["bracket depth"][i0:i + 1] = depth
        i += 1
    start = 0
    for line in text.split("\n"):  # the newline belongs to the line it ends
        end = min(start + len(line) + 1, n)
        indent = len(line) - len(line.lstrip(" "))
        f["indentation depth"][start:end] = indent
        f["in the indentation"][start:start + indent] = 1
        f["column in the line"][start:end] = np.arange(end - start)
        if end > start + len(line):
            f["is a newline"][end - 1] = 1
        start = end
    return f


def choose_units(acts: np.ndarray, features: dict, k: int, min_corr: float = 0.4) -> list:
    """The ``k`` most telling units of ``acts [N, H]``: ``[(unit, label, score), ...]``.

    First, greedily, the (feature, unit) pairs with the strongest correlation |r| >= ``min_corr``
    (each feature and unit used once, strongest first); then the units of largest variance.
    """
    acts = np.asarray(acts, dtype=np.float64)
    k = min(k, acts.shape[1])
    a = acts - acts.mean(0)
    a_norm = np.sqrt((a ** 2).sum(0))
    pairs = []
    for name, v in features.items():
        v = np.asarray(v, dtype=np.float64) - np.mean(v)
        v_norm = np.sqrt((v ** 2).sum())
        if v_norm == 0:
            continue  # the feature never changes in this text
        r = (a * v[:, None]).sum(0) / np.maximum(a_norm * v_norm, 1e-12)
        pairs += [(abs(r[u]), r[u], name, u) for u in range(acts.shape[1]) if abs(r[u]) >= min_corr]
    chosen, used_features, used_units = [], set(), set()
    for _, r, name, u in sorted(pairs, key=lambda p: -p[0]):
        if len(chosen) < k and name not in used_features and u not in used_units:
            chosen.append((int(u), f"{name} (r = {r:+.2f})", float(r)))
            used_features.add(name)
            used_units.add(u)
    std = acts.std(0)
    for u in np.argsort(-std, kind="stable"):
        if len(chosen) >= k:
            break
        if int(u) not in used_units:
            chosen.append((int(u), f"large variance (std {std[u]:.2f})", float(std[u])))
            used_units.add(int(u))
    return chosen


def gradient_norms(model: CharLanguageModel, text: str, max_distance: int = 100,
                   n_ends: int = 8, ends=None) -> dict:
    """How the gradient of one prediction's loss reaches earlier states, through the fused backward.

    For each loss position ``e`` (the loss ``L_e = -log p(x_{e+1} | x_0..x_e)``) and distance
    ``k``, ``||dL_e / ds_{e-k}||`` for the last layer's state ``s`` (``h``; the LSTM's ``(h, c)``
    together), any cell. The recurrence is rerun from ``s_{e-D}`` one fused step per call, all
    losses side by side in one batch, so that every state is a tensor of the autograd graph; each
    call's fused backward returns the carry ``dL/ds_{t-1}`` of its step, and autograd chains them.

    The gradient is carried back one step at a time, renormalised to norm 1 per loss after each
    step while the log of its norm accumulates: a vanishing gradient (a trained char model's falls
    below float64's ~1e-308 within ~100 steps) stays exact in ``log_norms`` instead of
    underflowing to zero.

    Returns ``{"distance": [D+1], "ends": [E], "log_norms": [E, D+1], "norms": [E, D+1]}`` (numpy,
    float64; ``log_norms`` natural logs, -inf where the gradient is exactly zero; ``norms`` their
    exp, which may underflow to 0: draw ``log_norms``).
    """
    model.eval()
    ids = encode_text(model, text)
    N = len(ids)
    D = min(max_distance, N - 2)
    if ends is None:
        ends = np.unique(np.linspace(D, N - 2, n_ends).round().astype(int))
    ends = torch.as_tensor(np.asarray(ends), dtype=torch.long)
    if len(ends) == 0 or int(ends.min()) < D or int(ends.max()) > N - 2:
        raise ValueError(f"loss positions must lie in [{D}, {N - 2}] for max_distance {D}")
    inp, step = _last_layer_steps(model, ids)
    starts = ends - D
    with torch.no_grad():  # s_{e-D} of every loss: the state after reading position e - D
        state, first = None, [None] * (int(starts.max()) + 1)
        for t in range(len(first)):
            state = step(inp[t:t + 1], state)
            first[t] = state
        first = tuple(torch.cat([first[int(t)][part] for t in starts]) for part in range(len(state)))
    chain = [tuple(part.clone().requires_grad_() for part in first)]
    for i in range(1, D + 1):
        chain.append(step(inp[starts + i], chain[-1]))  # s_{e-D+i}
    loss = F.cross_entropy(model.l_out(chain[-1][0]), ids[ends + 1], reduction="sum")  # rows independent
    grads = _grad(loss, chain[-1], None)  # dL/ds_e
    log_scale = torch.zeros(len(ends), dtype=torch.float64)  # log of what the gradient was divided by
    log_norms = []
    for i in range(D, -1, -1):  # grads = dL/ds_{e-D+i} / exp(log_scale), per loss (row)
        # of order 1: its squares cannot underflow
        norm = torch.stack([g.double().pow(2).sum(-1) for g in grads]).sum(0).sqrt()
        log_norms.append(log_scale + norm.log())
        if i == 0:
            break
        scale = torch.where(norm > 0, norm, torch.ones_like(norm))
        log_scale = log_scale + scale.log()
        grads = _grad(chain[i], chain[i - 1], [g / scale[:, None].to(g.dtype) for g in grads])
    log_norms = torch.stack(log_norms, dim=1).numpy()
    return {"distance": np.arange(D + 1), "ends": ends.numpy(), "log_norms": log_norms, "norms": np.exp(log_norms)}


def _grad(outputs, inputs: tuple, grad_outputs) -> tuple:
    """``torch.autograd.grad`` keeping the graph, zeros for an input the outputs do not reach
    (the LSTM's ``c_e``: the loss reads ``h_e`` only)."""
    found = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found))


def _last_layer_steps(model: CharLanguageModel, ids):
    """The last recurrent layer one step at a time: ``(inp, step)``, ``inp`` what it reads at each
    position of ``ids`` (``[N]`` ids, or ``[N, F]``: the embedding or the states of the layer
    below), ``step(x [R, ...], state) -> state`` with states as tuples of ``[R, *]`` tensors (the
    LSTM's ``(h, c)``, else ``(h,)``; ``state[0]`` is what the read-out reads; None: zeros)."""
    backend = model.rnn.backend
    if model.embedding is None:  # the course's cell: FusedRNN's own layers
        layer = model.rnn.layers[-1]

        def step(x, state):
            return (layer(x[:, None], None if state is None else state[0], None, backend)[1],)

        return _last_layer_input(model, ids)[0], step
    rnn, last = model.rnn, model.rnn.num_layers - 1  # a twin of torch's RNN, LSTM or GRU
    with torch.no_grad():
        x = model.embedding(ids[None])
        for k in range(last):
            x, _ = rnn._run_layer(x, k, None, None)

    def twin_step(x, state):
        return tuple(rnn._run_layer(x[:, None], last, state, None)[1])

    return x[0], twin_step


def step_factors(res: dict) -> np.ndarray:
    """``[E, D]``: by how much each step back multiplies the gradient's norm, ``||dL/dh_{e-k}|| /
    ||dL/dh_{e-k+1}||``, from the log norms (no underflow; NaN past an exactly zero gradient)."""
    with np.errstate(invalid="ignore"):
        return np.exp(np.diff(res["log_norms"], axis=1))


