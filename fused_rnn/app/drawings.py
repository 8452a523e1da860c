"""The pictures of ``inspect`` (and the loss curve of ``train``), drawn with matplotlib.

matplotlib is imported inside the functions, so this module imports without it. Each function
draws the numbers of :mod:`fused_rnn.app.analysis` into a PNG and returns its path.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from .analysis import gradient_norms, next_char_probs, step_factors
from .model import CharLanguageModel

MATPLOTLIB_HINT = 'inspect needs matplotlib: pip install -e ".[viz]"'


def pyplot():
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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


def draw_gradients(curves: list, path) -> str:
    """||dL/ds_t|| against the distance from the loss, and the factor each step back multiplies it
    by, for each ``(gradient_norms result, label)`` of ``curves`` (the first sets the scale)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=90)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (res, name), color in zip(curves, colors * len(curves)):
        d = res["distance"]
        # log10 of the norms as carried back (exact where float64's norms would underflow); an
        # exactly zero gradient ends its curve (NaN) rather than plotting -inf
        log10 = np.where(np.isfinite(res["log_norms"]), res["log_norms"] / np.log(10), np.nan)
        for ax, x, values in [(axes[0], d, log10), (axes[1], d[1:], step_factors(res))]:
            if values.size == 0:
                continue  # a 2-char text: no step back to show
            with warnings.catch_warnings():  # a column of NaN only (every gradient zero there)
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, mid, hi = np.nanquantile(values, [0.25, 0.5, 0.75], axis=0)
            ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
            ax.plot(x, mid, color=color, lw=2, label=f"{name} (median, 25-75% band)")
    axes[0].set_ylabel("log10 ||dL/ds_t||  (s: the state, h or the LSTM's h, c)")
    axes[0].set_title("Gradient of one prediction's loss reaching earlier states", fontsize=10.5)
    axes[1].axhline(1, color="0.4", lw=1, ls=":")
    factors = step_factors(curves[0][0])
    finite = factors[np.isfinite(factors)]
    axes[1].set_ylim(0, max(1.2, float(np.quantile(finite, 0.9)) * 1.1 if finite.size else 0))
    axes[1].set_ylabel("||dL/ds_t-1|| / ||dL/ds_t||")
    axes[1].set_title("What each step back multiplies it by (below 1: it shrinks)", fontsize=10.5)
    for ax in axes:
        ax.set_xlabel("distance from the loss (steps back)")
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return str(path)


