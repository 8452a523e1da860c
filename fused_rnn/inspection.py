"""``python -m fused_rnn inspect``: pictures of a trained char model, from the cell to its units.

The numbers (states, chosen units, gradient norms) come from plain functions that the tests
check; the drawing functions only turn them into pictures. matplotlib is imported inside the
drawing functions, so this module imports without it.

Only the last recurrent layer is inspected: it is the one the output layer reads.
"""
from __future__ import annotations

import base64
import html
import os

import numpy as np
import torch
import torch.nn.functional as F

from .train import CharLanguageModel, UserError, encode, load_checkpoint, sample

MATPLOTLIB_HINT = 'inspect needs matplotlib: pip install -e ".[viz]"'

# Python with strings, a comment, brackets and three levels of indentation: things a char model
# has to keep track of to predict the next char.
DEFAULT_TEXT = '''def greet(name, excited=False):
    """Say hello to name."""
    if not name:
        raise ValueError("no name")
    words = ["Hello", name]  # two parts
    for i, word in enumerate(words):
        if i > 0:
            print(", ", end="")
        print(word, end="")
    return "!" if excited else "."


class Counter:
    def __init__(self, start=0):
        self.count = start
'''


# ----------------------------------------------------------------------------------------------
# The numbers


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
    unknown = sorted(set(text) - set(model.config.vocab))
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise UserError(f"{what} has {len(unknown)} character(s) outside the model's vocabulary: {shown}")


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
    output, _ = model.rnn(encode_text(model, text)[None])
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
    ``k``, ``||dL_e / dh_{e-k}||`` for the last layer's states. The recurrence is rerun from
    ``h_{e-D}`` one fused step per call, all losses side by side in one batch, so that every
    state is a tensor of the autograd graph; each call's fused backward returns the carry
    ``dL/dh_{t-1}`` of its step, and autograd chains them.

    Returns ``{"distance": [D+1], "ends": [E], "norms": [E, D+1]}`` (numpy).
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
    layer, backend = model.rnn.layers[-1], model.rnn.backend
    inp = _last_layer_input(model, ids)[0]  # [N] ids or [N, H] states of the layer below
    with torch.no_grad():
        states = layer(inp[None], None, None, backend)[0][0]  # [N, H]
    starts = ends - D
    chain = [states[starts].clone().requires_grad_()]  # h_{e-D}, one row per loss
    for i in range(1, D + 1):
        _, h = layer(inp[starts + i][:, None], chain[-1], None, backend)
        chain.append(h)  # h_{e-D+i}
    loss = F.cross_entropy(model.l_out(chain[-1]), ids[ends + 1], reduction="sum")  # rows independent
    grads = torch.autograd.grad(loss, chain)
    # norms in float64: squaring fp32 gradients of ~1e-23 would underflow to zero
    norms = torch.stack([g.double().norm(dim=-1) for g in reversed(grads)], dim=1)
    return {"distance": np.arange(D + 1), "ends": ends.numpy(), "norms": norms.detach().numpy()}


def fresh_model(model: CharLanguageModel, seed: int = 0) -> CharLanguageModel:
    """A freshly initialised model of the same shape (the same config and backend)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CharLanguageModel(model.config, backend=model.rnn.backend).to(model.l_out.weight.dtype).eval()


# ----------------------------------------------------------------------------------------------
# The pictures


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; a caller's own pyplot backend is left alone
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    """Saves a figure as a 256-colour PNG (a third of the size of a full-colour one, the same
    look for these flat drawings) and closes it."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def show_char(c: str) -> str:
    """A visible stand-in for whitespace."""
    return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(c, c)


def save_loss_curve(path, history) -> str:
    """Draws the train loss per step (raw, faint, and smoothed) and the validation loss per epoch
    into a PNG at ``path``; returns ``path``. ``history``: ``{"step": [...], "train_loss": [...],
    "val": [[step, val_loss], ...]}``."""
    plt = _pyplot()
    steps = np.asarray(history.get("step", []), dtype=float)
    loss = np.asarray(history.get("train_loss", []), dtype=float)
    val = np.asarray(history.get("val", []), dtype=float).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if len(loss):
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train loss (each step)")
        w = max(1, len(loss) // 40)  # a centred running mean: it does not lag behind the raw loss
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(steps[w // 2:w // 2 + len(smooth)], smooth, color="tab:blue", lw=1.8,
                label=f"train loss (mean of {w} steps)" if w > 1 else "train loss")
    if len(val):
        ax.plot(val[:, 0], val[:, 1], "o-", color="tab:red", lw=1.5, label="validation loss (each epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per char (nats)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save(fig, path)
    return str(path)


def _box(ax, x, y, w, h, text, fill, fontsize=10, style="round,pad=0.3", **kw):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, fc=fill, ec="0.25", lw=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, **kw)


def _arrow(ax, start, end, color="0.2", lw=1.5, style="-|>", ls="-", **kw):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, color=color, lw=lw,
                                 linestyle=ls, shrinkA=0, shrinkB=0, **kw))


def draw_cell(model: CharLanguageModel, path) -> str:
    """The cell as the course's layers with this model's sizes, and where each part runs."""
    plt = _pyplot()
    from matplotlib.patches import FancyBboxPatch

    cfg = model.config
    V, E, H, L = len(cfg.vocab), cfg.n_fac, cfg.hidden_size, cfg.num_layers
    fig, ax = plt.subplots(figsize=(14, 4.8), dpi=90)
    ax.set_xlim(0, 140)
    ax.set_ylim(-1, 43)
    ax.axis("off")
    y = 22
    # where each part runs: shaded regions behind the boxes
    regions = [(12, 42, "#fde9c8", "outside the kernel, once per call:\n"
                f"U = e.weight @ l_in.weightᵀ + b_in,\na {V} × {H} table"),
               (45, 106, "#d6e8fa", "inside the fused kernel: all T steps in one launch\n"
                "(gather row U[x_t], relu, add h_t-1, one H × H matmul, tanh)"),
               (109, 139, "#fde9c8", "outside the kernel, after it:\n"
                "l_out on all T states at once\n(one large matmul)")]
    for x0, x1, color, label in regions:
        ax.add_patch(FancyBboxPatch((x0, 0), x1 - x0, 42, boxstyle="round,pad=0,rounding_size=2",
                                    fc=color, ec="none", zorder=0))
        ax.text((x0 + x1) / 2, 40.5, label, ha="center", va="top", fontsize=9.5, color="0.15")
    _box(ax, 6, y, 9, 7, f"x_t\na char\n(1 of {V})", "white")
    _box(ax, 19.5, y, 11, 7, f"e: embedding\n{V} → {E}", "#f6c27a")
    _box(ax, 35, y, 11, 7, f"l_in: linear\n{E} → {H}", "#f6c27a")
    _box(ax, 50, y, 6, 4.5, "relu", "white")
    ax.add_patch(plt.Circle((60, y), 2.6, fc="white", ec="0.25", lw=1.2))
    ax.text(60, y, "+", ha="center", va="center", fontsize=16)
    _box(ax, 73, y, 13, 7, f"l_hidden: linear\n{H} → {H}", "#8fbfe8")
    _box(ax, 87, y, 6, 4.5, "tanh", "white")
    _box(ax, 99.5, y, 9.5, 6, f"h_t\n({H})", "#5b9bd5", color="white", fontweight="bold")
    _box(ax, 118, y, 11, 7, f"l_out: linear\n{H} → {V}", "#f6c27a")
    _box(ax, 133, y, 9, 7, "softmax:\np(next char)", "white")
    for x0, x1 in [(10.5, 14), (25, 29.5), (40.5, 47), (53, 57.4), (62.6, 66.5), (79.5, 84), (90, 94.75),
                   (104.25, 112.5), (123.5, 128.5)]:
        _arrow(ax, (x0, y), (x1, y))
    ax.text(43.8, y + 1.2, "U[x_t]", ha="center", fontsize=9.5)
    ax.text(55.2, y + 1.2, "r_t", ha="center", fontsize=10)
    # the state loops back: h_t becomes h_t-1 of the next step
    _arrow(ax, (99.5, y - 3), (99.5, 8), style="-")
    _arrow(ax, (99.5, 8), (60, 8), style="-")
    _arrow(ax, (60, 8), (60, y - 2.6))
    ax.text(79.5, 8.8, "h_t-1: the state, fed back at the next step (h_0 = 0)", ha="center", fontsize=9.5)
    layers = f"; this model stacks {L} layers, each like this one (the first reads chars)" if L > 1 else ""
    ax.set_title(f"The cell: two linear layers of {H} units (l_in, l_hidden), the state added in between{layers}\n"
                 "h_t = tanh(l_hidden(h_t-1 + relu(l_in(e(x_t)))))", fontsize=12)
    fig.tight_layout()
    _save(fig, path)
    return str(path)


PAD = "round,pad=0.04"  # box padding for pictures drawn in units of about an inch


def draw_unrolled(model: CharLanguageModel, text: str, path, steps: int = 10) -> str:
    """The cell unrolled over the first chars of ``text``: inputs, states, the most likely next
    char, state arrows forward and gradient arrows (with their norms) back from the last loss."""
    plt = _pyplot()
    S = max(1, min(steps, len(text) - 1))
    probs = next_char_probs(model, text[:S + 1])[:S]
    grads = gradient_norms(model, text[:S + 1], max_distance=S - 1, ends=[S - 1])["norms"][0]
    vocab = model.config.vocab
    width = max(S, 7)  # room for the title under short texts
    fig, ax = plt.subplots(figsize=(1.3 * width + 3.2, 5.4), dpi=90)
    ax.set_xlim(-0.9, 1.3 * width + 2.3)
    ax.set_ylim(-0.4, 6.3)
    ax.axis("off")
    xs = [1.3 * (i + 1) for i in range(S)]  # h_0 sits at x = 0
    _box(ax, 0, 3, 0.8, 0.7, "h_0\n= 0", "white", fontsize=9, style=PAD)
    ax.text(0, 0.6, "input\nchar", ha="center", va="center", fontsize=9, color="0.3")
    ax.text(0, 5.05, "most likely\nnext char", ha="center", va="center", fontsize=9, color="0.3")
    for i, x in enumerate(xs):
        top = int(probs[i].argmax())
        right = vocab[top] == text[i + 1]
        _box(ax, x, 0.6, 0.8, 0.6, show_char(text[i]), "white", fontsize=13, family="monospace", style=PAD)
        ax.text(x, 0.05, f"x_{i + 1}", ha="center", va="center", fontsize=9, color="0.3")
        _arrow(ax, (x, 0.95), (x, 2.6))
        _box(ax, x, 3, 0.8, 0.7, f"h_{i + 1}", "#5b9bd5", fontsize=11, color="white", fontweight="bold", style=PAD)
        _arrow(ax, (x, 3.4), (x, 4.7))
        _box(ax, x, 5.05, 0.8, 0.6, show_char(vocab[top]), "#d9f2d9" if right else "#f2dcdc",
             fontsize=13, family="monospace", style=PAD)
        ax.text(x, 5.75, f"{probs[i, top]:.0%}", ha="center", fontsize=9, color="0.3")
    for i in range(S):  # state forward (above), gradient backward (below)
        x0 = xs[i - 1] if i > 0 else 0
        _arrow(ax, (x0 + 0.45, 3.18), (xs[i] - 0.45, 3.18), color="#1f5fa8", lw=1.8)
        if i > 0:
            _arrow(ax, (xs[i] - 0.45, 2.8), (x0 + 0.45, 2.8), color="#c0392b", lw=1.4, ls="--")
            ax.text((x0 + xs[i]) / 2, 2.4, f"{grads[S - i]:.2g}", ha="center", fontsize=8.5, color="#c0392b")
    xl = xs[-1]
    ax.text(xl + 0.6, 5.05, f"loss =\n-log p({show_char(text[S])!r})", ha="left", va="center", fontsize=9.5,
            color="#c0392b")
    _arrow(ax, (xl + 0.9, 4.55), (xl + 0.45, 3.0), color="#c0392b", lw=1.4, ls="--")
    ax.text(xl + 0.8, 3.4, f"{grads[0]:.2g}", ha="left", fontsize=8.5, color="#c0392b")
    ax.set_title("The same cell at every step: state forward (blue), gradient of the last step's loss "
                 "back (red, with its norm ||dL/dh_t||)\ngreen: the guess is the actual next char; "
                 "red: it is not", fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    return str(path)


def _text_grid(text, max_lines, max_cols):
    """(rows of chars, their index in text) for a text laid out in lines, cropped."""
    rows, idx, start = [], [], 0
    for line in text.split("\n"):
        n = len(line) + 1  # the newline belongs to its line
        cols = list(range(start, min(start + n, len(text))))[:max_cols]
        rows.append([text[j] for j in cols])
        idx.append(cols)
        start += n
        if len(rows) == max_lines:
            break
    while rows and not rows[-1]:
        rows.pop(), idx.pop()
    return rows, idx


def draw_activations(text, acts, units, path, heat_chars: int = 90, max_lines: int = 16,
                     max_cols: int = 58) -> str:
    """Per chosen unit, the text coloured by its activation; then a units x chars heatmap."""
    plt = _pyplot()
    from matplotlib.gridspec import GridSpec

    rows, idx = _text_grid(text, max_lines, max_cols)
    n_cols = max(len(r) for r in rows)
    n_lines = len(rows)
    panel_rows = (len(units) + 1) // 2
    panel_h = 0.145 * n_lines + 0.45
    heat_n = min(heat_chars, len(text))
    heat_h = 0.24 * len(units) + 1.3
    fig = plt.figure(figsize=(13, panel_rows * panel_h + heat_h + 0.9), dpi=85)
    height = fig.get_figheight()
    gs = GridSpec(panel_rows + 1, 2, figure=fig, height_ratios=[panel_h] * panel_rows + [heat_h],
                  hspace=0.32, wspace=0.05, left=0.07, right=0.94, top=1 - 0.75 / height, bottom=0.6 / height)
    # RdBu mixed with white, so the black chars stay readable on saturated units
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(0.6 * plt.get_cmap("bwr")(np.linspace(0, 1, 256)) + 0.4)
    norm = plt.Normalize(-1, 1)
    for p, (u, label, _) in enumerate(units):
        ax = fig.add_subplot(gs[p // 2, p % 2])
        grid = np.full((n_lines, n_cols), np.nan)
        for li, cols in enumerate(idx):
            grid[li, :len(cols)] = acts[cols, u]
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest",
                  extent=(-0.5, n_cols - 0.5, n_lines - 0.5, -0.5))
        for li, row in enumerate(rows):
            for ci, c in enumerate(row):
                if c != " ":
                    ax.text(ci, li, show_char(c) if c == "\n" else c, ha="center", va="center",
                            fontsize=7.5, family="monospace", color="0.5" if c == "\n" else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"unit {u}: {label}", fontsize=9.5, loc="left")
    ax = fig.add_subplot(gs[panel_rows, :])
    heat = np.stack([acts[:heat_n, u] for u, _, _ in units])
    im = ax.imshow(heat, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(units)), [f"unit {u}" for u, _, _ in units], fontsize=8)
    ax.set_xticks(range(heat_n), [show_char(c) for c in text[:heat_n]], fontsize=8, family="monospace")
    ax.tick_params(axis="x", length=0)
    ax.set_title(f"the same units over the first {heat_n} chars (each column: the state after reading that char)",
                 fontsize=9.5, loc="left")
    fig.colorbar(im, ax=ax, fraction=0.02, pad=0.01, label="activation")
    fig.suptitle("What the units learned: each char's background is the unit's value after reading it "
                 "(blue -1 ... red +1, tanh's range)", fontsize=11.5, y=1 - 0.25 / height)
    _save(fig, path)
    return str(path)


def step_factors(res: dict) -> np.ndarray:
    """``[E, D]``: by how much each step back multiplies the gradient's norm, ``||dL/dh_{e-k}|| /
    ||dL/dh_{e-k+1}||``."""
    n = np.maximum(res["norms"], 1e-300)
    return n[:, 1:] / n[:, :-1]


def draw_gradients(trained: dict, fresh: dict, path) -> str:
    """||dL/dh_t|| against the distance from the loss, trained vs freshly initialised, and the
    factor each step back multiplies it by."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=90)
    for res, name, color in [(trained, "trained model", "tab:blue"), (fresh, "freshly initialised", "tab:orange")]:
        d = res["distance"]
        for ax, x, values in [(axes[0], d, np.maximum(res["norms"], 1e-300)), (axes[1], d[1:], step_factors(res))]:
            if values.size == 0:
                continue  # a 2-char text: no step back to show
            lo, mid, hi = np.quantile(values, [0.25, 0.5, 0.75], axis=0)
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
            ax.plot(x, mid, color=color, lw=2, label=f"{name} (median, 25-75% band)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("||dL/dh_t||  (log scale)")
    axes[0].set_title("Gradient of one prediction's loss reaching earlier states", fontsize=10.5)
    axes[1].axhline(1, color="0.4", lw=1, ls=":")
    factors = step_factors(trained)
    axes[1].set_ylim(0, max(1.2, float(np.quantile(factors, 0.9)) * 1.1 if factors.size else 0))
    axes[1].set_ylabel("||dL/dh_t-1|| / ||dL/dh_t||")
    axes[1].set_title("What each step back multiplies it by (below 1: it shrinks)", fontsize=10.5)
    for ax in axes:
        ax.set_xlabel("distance from the loss (steps back)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# The command


def add_inspect_arguments(parser):
    """Adds the ``inspect`` command's options to an argparse (sub)parser."""
    from .__main__ import positive_int

    parser.add_argument("--checkpoint", default="checkpoints/char_rnn.pt", help="a model saved by train")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help="a UTF-8 file whose first --chars chars the model reads "
                                                  "(default: a short built-in Python snippet)")
    src.add_argument("--prime", default=None, help="let the model write --chars chars from this start, "
                                                   "and look at it reading its own text")
    parser.add_argument("--out", default="inspect", help="folder for the PNGs and index.html")
    parser.add_argument("--chars", type=positive_int, default=400, help="chars of text to look at")
    parser.add_argument("--units", type=positive_int, default=8, help="units to show")
    return parser


def _read_text(opts, model) -> str:
    if opts.text is not None:
        try:
            with open(opts.text, encoding="utf-8", errors="replace") as fh:
                text = fh.read(opts.chars)
        except OSError as exc:
            raise UserError(f"cannot read text {opts.text!r}: {exc.strerror}") from None
    elif opts.prime is not None:
        if not opts.prime:
            raise UserError('the text to inspect is empty (--prime "")')
        check_vocabulary(model, opts.prime, "--prime")
        text = sample(model, opts.prime, max(opts.chars - len(opts.prime), 1), seed=0)
    else:
        text = DEFAULT_TEXT
    text = text[:opts.chars]
    encode_text(model, text)  # one-line errors for empty text or unknown chars
    return text


def _png_base64(path):
    with open(path, "rb") as fh:
        return base64.b64encode(fh.read()).decode("ascii")


def _decay(res, at):
    """(distance, median ||dL/dh|| there relative to the loss step, median factor per step)."""
    rel = np.median(res["norms"] / np.maximum(res["norms"][:, :1], 1e-300), axis=0)
    at = min(at, len(rel) - 1)
    factor = float(np.median(step_factors(res))) if len(rel) > 1 else float("nan")
    return at, rel[at], factor


def run_inspect(opts) -> int:
    """Writes cell.png, unrolled.png, activations.png, gradients.png and index.html into
    ``opts.out`` and prints their paths. Raises UserError for a user mistake."""
    try:
        _pyplot()
    except ImportError:
        raise UserError(MATPLOTLIB_HINT) from None
    model = load_checkpoint(opts.checkpoint, device="cpu", backend="auto").eval()
    text = _read_text(opts, model)
    try:
        os.makedirs(opts.out, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the folder {opts.out!r}: {exc.strerror}") from None
    cfg = model.config
    V, E, H, L = len(cfg.vocab), cfg.n_fac, cfg.hidden_size, cfg.num_layers
    layer_note = f" (the last of its {L} layers)" if L > 1 else ""

    acts = unit_activations(model, text)
    units = choose_units(acts, char_features(text), opts.units)
    trained = gradient_norms(model, text)
    fresh = gradient_norms(fresh_model(model), text)
    probs = next_char_probs(model, text)
    ids = encode_text(model, text).numpy()
    nll = -np.log(np.maximum(probs[np.arange(len(text) - 1), ids[1:]], 1e-30)).mean()
    right = (probs[:-1].argmax(-1) == ids[1:]).mean()

    paths = {name: os.path.join(opts.out, name + ".png")
             for name in ("cell", "unrolled", "activations", "gradients")}
    draw_cell(model, paths["cell"])
    draw_unrolled(model, text, paths["unrolled"])
    draw_activations(text, acts, units, paths["activations"])
    draw_gradients(trained, fresh, paths["gradients"])

    at, t_decay, t_factor = _decay(trained, 20)
    _, f_decay, f_factor = _decay(fresh, 20)
    n_feat = sum(1 for _, label, _ in units if "r =" in label)
    captions = {
        "cell": f"One step of the RNN. The character <code>x_t</code> is looked up in an embedding of "
                f"{E} numbers and passed through the first linear layer (<code>l_in</code>, {E} &rarr; {H}) "
                f"and a relu. The previous hidden state <code>h_t-1</code> ({H} numbers, all zeros before the "
                f"first char) is <em>added</em> to that, and the sum goes through the second linear layer "
                f"(<code>l_hidden</code>, {H} &rarr; {H}) and a tanh, giving the new state <code>h_t</code>. "
                f"The output layer (<code>l_out</code>, {H} &rarr; {V}) turns the state into scores for each of "
                f"the {V} characters. The shading shows how the fused version computes it: embedding and "
                f"<code>l_in</code> collapse into one {V} &times; {H} table, computed once; the kernel "
                f"only gathers a row of it at each step, so the one sequential part is a single "
                f"{H} &times; {H} matrix product per step; <code>l_out</code> runs once over all states afterwards.",
        "unrolled": f"The same cell (the same weights) at each of the first {min(10, len(text) - 1)} characters of "
                    f"the text. Blue arrows carry the state forward: each step sees the current character and, "
                    f"through the state, everything before it. Above each step is the character the model finds "
                    f"most likely to come next and its probability (green when right). Training "
                    f"(backpropagation through time) sends the gradient of the loss back along the red arrows, "
                    f"one step at a time; the numbers are the sizes of <code>dL/dh_t</code> for the loss at the "
                    f"last step shown.",
        "activations": f"Each of the {H} hidden units{layer_note} is one number in the state, between -1 and +1. "
                       f"Each panel colours the text (at most its first 16 lines and 58 columns) by one unit's value "
                       f"after reading each character. "
                       f"The units are chosen from this text: first the units most strongly correlated "
                       f"(Pearson |r| &ge; 0.4) with simple facts about each character (inside a string, inside a "
                       f"comment, in the indentation, indentation depth, bracket depth, column, newline), "
                       f"one unit per fact, strongest first ({n_feat} found); then the units whose value varies "
                       f"most. A correlation on a few hundred characters is a hint, not a proof. "
                       f"The heatmap shows the same units side by side over the first characters.",
        "gradients": f"How far back can the model learn from? Training changes the weights by gradients, "
                     f"and a character far back in the text can only teach the model through the gradient "
                     f"that reaches its state. For {len(trained['ends'])} predictions in the text, the left panel "
                     f"shows the size of the gradient of that prediction's loss with respect to each earlier "
                     f"state{layer_note} (median and 25-75% band over the predictions, log scale), computed with "
                     f"the fused backward. Each step back multiplies it by the tanh's slope and "
                     f"<code>l_hidden</code>'s weights (right panel): typically by {t_factor:.2f} in the trained "
                     f"model and {f_factor:.2f} in a freshly initialised one. {at} steps back, the trained "
                     f"model's gradient is {t_decay:.1e} times its size at the loss step, the fresh "
                     f"one's {f_decay:.1e} times. This geometric shrinking is the vanishing gradient of "
                     f"vanilla RNNs: what lies a few dozen characters back barely reaches the weights.",
    }
    titles = {"cell": "1. The cell", "unrolled": "2. Unrolled over time",
              "activations": "3. What the units learned", "gradients": "4. How gradients flow back"}
    sections = "\n".join(
        f'<h2>{titles[k]}</h2>\n<img src="data:image/png;base64,{_png_base64(paths[k])}" alt="{k}">\n'
        f"<p>{captions[k]}</p>" for k in titles)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Inside the char-RNN</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.5;color:#222}}
img{{max-width:100%;border:1px solid #ddd}} pre{{background:#f6f6f6;padding:.8em;overflow-x:auto}}
p{{max-width:900px}}</style></head><body>
<h1>Inside the char-RNN</h1>
<p>A vanilla recurrent network that reads text one character at a time and predicts the next one.
This model: {V} characters, an embedding of {E}, {L} layer{"s" if L > 1 else ""} of {H} hidden units; checkpoint
<code>{html.escape(os.path.basename(opts.checkpoint))}</code>. On the text below it predicts the next character
with a loss of {nll:.3f} nats per character, and its first guess is right {right:.0%} of the time.
The pictures go from the cell (one step), to the cell repeated over the text, to what single units of
its state respond to, to how far back training can reach.</p>
<pre>{html.escape(text)}</pre>
{sections}
</body></html>
"""
    page_path = os.path.join(opts.out, "index.html")
    with open(page_path, "w", encoding="utf-8") as fh:
        fh.write(page)
    for p in list(paths.values()) + [page_path]:
        print(p)
    return 0
