"""The ``inspect`` command: reads a text, computes the numbers, draws the four pictures and
writes them, with a caption each, into one self-contained HTML page."""
from __future__ import annotations

import base64
import html
import os

import numpy as np

from .analysis import (char_features, check_vocabulary, choose_units, encode_text, gradient_norms,
                       next_char_probs, step_factors, unit_activations)
from .checkpoint import load_checkpoint
from .drawings import MATPLOTLIB_HINT, draw_activations, draw_cell, draw_gradients, draw_unrolled, pyplot
from .errors import UserError
from .model import fresh_model
from .sampling import sample


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


def _read_text(opts, model) -> str:
    if opts.text is not None:
        try:
            with open(opts.text, encoding="utf-8-sig", errors="replace") as fh:
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
    rel = np.exp(np.median(res["log_norms"] - res["log_norms"][:, :1], axis=0))  # no underflow
    at = min(at, len(rel) - 1)
    factor = float(np.nanmedian(step_factors(res))) if len(rel) > 1 else float("nan")
    return at, rel[at], factor


def run_inspect(opts) -> int:
    """Writes cell.png, unrolled.png, activations.png, gradients.png and index.html into
    ``opts.out`` and prints their paths. Raises UserError for a user mistake."""
    try:
        pyplot()
    except ImportError:
        raise UserError(MATPLOTLIB_HINT) from None
    model = load_checkpoint(opts.checkpoint, device="cpu", backend="auto").eval()
    course = model.embedding is None  # the cell and unrolled pictures draw the course's cell
    text = _read_text(opts, model)
    others = []  # --compare: other models' gradients on the same text
    for path in opts.compare or []:
        other = load_checkpoint(path, device="cpu", backend="auto").eval()
        check_vocabulary(other, text, f"the text (for {path})")
        others.append((other, path))
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

    shown = ("cell", "unrolled", "activations", "gradients") if course else ("activations", "gradients")
    paths = {name: os.path.join(opts.out, name + ".png") for name in shown}
    if course:
        draw_cell(model, paths["cell"])
        draw_unrolled(model, text, paths["unrolled"])
    draw_activations(text, acts, units, paths["activations"])
    cell = cfg.cell
    curves = [(trained, f"{cell}: trained"), (fresh, f"{cell}: freshly initialised")]
    curves += [(gradient_norms(other, text), f"{other.config.cell}: {os.path.basename(path)}") for other, path in others]
    draw_gradients(curves, paths["gradients"])

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
                     f"the fused backward. Each step back multiplies it by the cell's slopes and "
                     f"recurrent weights (right panel): typically by {t_factor:.2f} in the trained "
                     f"model and {f_factor:.2f} in a freshly initialised one. {at} steps back, the trained "
                     f"model's gradient is {t_decay:.1e} times its size at the loss step, the fresh "
                     f"one's {f_decay:.1e} times. This geometric shrinking is the vanishing gradient of "
                     f"vanilla RNNs: what lies a few dozen characters back barely reaches the weights. "
                     f"The LSTM's cell state <code>c</code> is carried on by its forget gate alone, with no "
                     f"squashing product in the way, which is why it was built: train one with "
                     f"<code>--cell lstm</code> and draw it beside this one with <code>--compare</code>.",
    }
    titles = {"cell": "The cell", "unrolled": "Unrolled over time",
              "activations": "What the units learned", "gradients": "How gradients flow back"}
    sections = "\n".join(
        f'<h2>{i}. {titles[k]}</h2>\n<img src="data:image/png;base64,{_png_base64(paths[k])}" alt="{k}">\n'
        f"<p>{captions[k]}</p>" for i, k in enumerate(shown, 1))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Inside the char-RNN</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.5;color:#222}}
img{{max-width:100%;border:1px solid #ddd}} pre{{background:#f6f6f6;padding:.8em;overflow-x:auto}}
p{{max-width:900px}}</style></head><body>
<h1>Inside the char-RNN</h1>
<p>A recurrent network ({cfg.cell} cell) that reads text one character at a time and predicts the next one.
This model: {V} characters, an embedding of {E}, {L} layer{"s" if L > 1 else ""} of {H} hidden units; checkpoint
<code>{html.escape(os.path.basename(opts.checkpoint))}</code>. On the text below it predicts the next character
with a loss of {nll:.3f} nats per character, and its first guess is right {right:.0%} of the time.
The pictures go {"from the cell (one step), to the cell repeated over the text, to " if course else "from "}what
single units of its state respond to, to how far back training can reach.</p>
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
