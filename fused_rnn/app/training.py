"""The ``train`` command: the training loop, its run options, resuming, and stopping cleanly.

The model predicts the next char at every step. Under torchrun each process trains on its own
random windows with DistributedDataParallel; rank 0 reports, evaluates, samples and saves.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import (check_finite, check_writable, checkpoint_config, not_a_model, read_checkpoint,
                         save_checkpoint)
from .corpus import encode, load_corpus, random_windows
from .devices import check_backend_runs_on
from .errors import Interrupted, UserError
from .model import MODEL_CELLS, CharLanguageModel, ModelConfig, non_finite_parameters
from .progress import Progress
from .sampling import sample
from .signals import stop_requests

# The options that define a run. `train --resume` takes them from the checkpoint, and one given
# again must agree with it; --epochs (the total), devices, backend and output options may change.
RUN_DEFAULTS = dict(corpus=None, max_chars=2_000_000, seq_len=64, n_fac=42, hidden_size=256,
                    num_layers=1, dropout=0.0, batch_size=64, steps=400, lr=3e-3, seed=0, cell=MODEL_CELLS[0])
SEED_RANGE = (0, 2**64 - 1)  # what torch.manual_seed takes


def _bad_run_value(key, v) -> bool:
    """Whether a run option read from a checkpoint is damaged (the command line checks its own)."""
    if key == "corpus":
        return v is not None and not isinstance(v, str)
    if key == "cell":
        return v not in MODEL_CELLS
    if key == "seed":
        return type(v) is not int or not SEED_RANGE[0] <= v <= SEED_RANGE[1]
    if key in ("lr", "dropout"):
        return type(v) not in (int, float) or not math.isfinite(v) or not (0 < v if key == "lr" else 0 <= v < 1)
    return type(v) is not int or v < 1


def run_options(opts, ckpt=None) -> dict:
    """The options of the run: the command line's over the defaults, or for ``--resume`` the
    checkpoint's (a conflicting one given again is a UserError)."""
    given = {k: getattr(opts, k) for k in RUN_DEFAULTS if hasattr(opts, k)}
    if given.get("corpus") is not None:
        given["corpus"] = os.path.abspath(given["corpus"])  # a resume may run from another folder
    if ckpt is None:
        return {**RUN_DEFAULTS, **given}
    if "run" not in ckpt:
        raise UserError(f"checkpoint {opts.checkpoint!r} holds no training state to resume "
                        f"(saved by an older version); start a new run")
    if not isinstance(ckpt["run"], dict) or set(ckpt["run"]) - set(RUN_DEFAULTS):
        raise not_a_model(opts.checkpoint, ValueError("its run options are damaged"))
    run = {**RUN_DEFAULTS, **ckpt["run"]}
    for k, v in run.items():
        if _bad_run_value(k, v):
            raise not_a_model(opts.checkpoint, ValueError(f"its run option {k} is damaged: {v!r:.40}"))
    for k, v in given.items():
        if v != run[k]:
            raise UserError(f"--{k.replace('_', '-')} {v} conflicts with the checkpoint's {run[k]} "
                            f"(--resume continues its run: leave the option out)")
    return run


_MASK64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    """splitmix64's finalizer: a bijection on 64-bit ints that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed, rank, step) -> int:
    """The random state of one step, a function of (seed, rank, step) only: a resumed run draws
    the same windows and dropout masks as one that never stopped. Explicit integer mixing, in
    [0, 2**63), not hash(): the same on every interpreter and version."""
    h = 0
    for v in (seed, rank, step):
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


@torch.no_grad()
def evaluate(model, data, seq_len, batch_size, device, max_windows=256):
    """Mean next-char cross-entropy over fixed, non-overlapping windows of the data."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq_len)
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    windows = data[idx]
    total = 0.0
    for i in range(0, n, batch_size):
        chunk = windows[i:i + batch_size].to(device)
        logits, _ = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq_len)


def loss_curve_path(checkpoint: str) -> str:
    return (checkpoint[:-3] if checkpoint.endswith(".pt") else checkpoint) + "_loss.png"


def _draw_loss_curve(checkpoint, history) -> str:
    """The line that says where the loss curve went, or why it was not drawn."""
    try:
        from .drawings import save_loss_curve

        return f"loss curve: {save_loss_curve(loss_curve_path(checkpoint), history)}"
    except ImportError:
        return 'loss curve: not drawn (pip install -e ".[viz]" for matplotlib)'


def train(opts) -> CharLanguageModel:
    """Runs the training described by the parsed command-line options ``opts``. Raises
    :class:`UserError` for a mistake (before any training when it can be seen then), and
    :class:`Interrupted` after saving on SIGINT/SIGTERM."""
    check_writable(opts.checkpoint)
    rank, world, device = distributed.setup(opts.device)
    try:
        check_backend_runs_on(opts.backend, device)
        return _train(opts, rank, world, device)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory on {device}: lower --batch-size, --seq-len or --hidden-size") from None
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _make_model(config, backend, device):
    try:
        return CharLanguageModel(config, backend=backend).to(device)
    except (RuntimeError, MemoryError, OverflowError) as exc:  # sizes that cannot be allocated
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot make a model with hidden size {config.hidden_size}, embedding {config.n_fac} "
                        f"and {config.num_layers} layer(s) on {device}: {first}") from None


def _train(opts, rank, world, device):
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    ckpt = read_checkpoint(opts.checkpoint) if opts.resume else None
    run = run_options(opts, ckpt)
    seq_len, batch_size, steps = run["seq_len"], run["batch_size"], run["steps"]
    if ckpt:
        config, step = checkpoint_config(ckpt, opts.checkpoint), ckpt.get("step")
        if type(step) is not int or step < 0:
            raise not_a_model(opts.checkpoint, ValueError(f"its step is damaged: {step!r:.40}"))
        if step >= opts.epochs * steps:
            raise UserError(f"the run in {opts.checkpoint!r} is at step {step}, already past --epochs "
                            f"{opts.epochs} ({steps} steps each): nothing to train; --epochs is the total, "
                            f"give a larger one")
    if main and run["dropout"] > 0 and run["num_layers"] == 1:
        print(f"warning: --dropout {run['dropout']} does nothing with one layer (it applies between "
              f"stacked layers)", file=sys.stderr)
    text = load_corpus(run["corpus"], run["max_chars"])
    vocab = config.vocab if ckpt else "".join(sorted(set(text)))
    data = encode(text, vocab)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    if len(val_data) <= seq_len + 1 or len(train_data) <= seq_len + 1:
        raise UserError(f"corpus too short ({len(data):,} char{'' if len(data) == 1 else 's'}) for --seq-len "
                        f"{seq_len}: it needs about {10 * (seq_len + 2):,} (a tenth is held out for validation)")
    if not ckpt:
        config = ModelConfig(vocab, run["n_fac"], run["hidden_size"], run["num_layers"], run["dropout"], run["cell"])
    torch.manual_seed(run["seed"])  # the same initial weights in every process
    model = _make_model(config, opts.backend, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=run["lr"])
    step, history = 0, {"step": [], "train_loss": [], "val": []}
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, history = ckpt["step"], ckpt["history"]
        except Exception as exc:  # a damaged or foreign training state
            raise not_a_model(opts.checkpoint, exc) from None
        check_finite(model, opts.checkpoint)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    log(f"corpus: {run['corpus'] or 'Python standard library source'}, {len(data):,} chars, "
        f"vocab {len(vocab)}; model: {config.cell} cell, hidden {config.hidden_size} x {config.num_layers} layer(s), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; device {device}"
        f"{f' x {world} processes' if world > 1 else ''}, backend {opts.backend}")
    if ckpt:
        log(f"resumed from {opts.checkpoint} at step {step} (epoch {step // steps + 1}, "
            f"step {step % steps} of {steps})")
    elif main:
        val = evaluate(model, val_data, seq_len, batch_size, device)
        history["val"].append([0, val])
        log(f"epoch 0: val loss {val:.4f} (uniform guess: {math.log(len(vocab)):.4f})")
    saved_step = step if ckpt else None  # the step of the checkpoint on disk

    def diverged(at, what):
        kept = (f"the last checkpoint ({opts.checkpoint}, step {saved_step}) is kept" if saved_step is not None
                else "no checkpoint was saved")
        return UserError(f"training diverged at step {at}: {what}; try a lower --lr (this run: {run['lr']:g}); {kept}")

    def save():
        nonlocal saved_step
        bad = non_finite_parameters(model)
        if bad:  # never replace a good checkpoint by a diverged one
            raise diverged(step, f"the weights ({bad[0]}) are not finite")
        save_checkpoint(opts.checkpoint, model, step, history["val"][-1][1] if history["val"] else None,
                        optimizer=optimizer.state_dict(), run=run, history=history)
        saved_step = step

    def stop(signum, progress=None):
        if progress is not None:
            progress.close()
        if main:
            save()
            log(f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint saved to {opts.checkpoint}")
        raise Interrupted(128 + signum)

    with stop_requests() as received:
        for epoch in range(step // steps + 1, opts.epochs + 1):
            progress = Progress(steps, f"epoch {epoch}/{opts.epochs}", main, initial=step % steps)
            t0, chars, running = time.perf_counter(), 0, None
            try:
                while step < epoch * steps:
                    torch.manual_seed(step_seed(run["seed"], rank, step))
                    x, y = random_windows(train_data, batch_size, seq_len, None)
                    x, y = x.to(device), y.to(device)
                    logits, _ = net(x)
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), 1.0))
                    value = loss.item()
                    # Every process takes both decisions together, before the weights change.
                    signum, bad = distributed.agree(
                        [received[0] if received else 0, int(not (math.isfinite(value) and math.isfinite(grad_norm)))],
                        world, device)
                    if signum:
                        stop(signum, progress)
                    if bad:
                        raise diverged(step + 1, f"the loss is {value}" if not math.isfinite(value)
                                       else "the gradient is not finite")
                    optimizer.step()
                    step += 1
                    chars += x.numel() * world
                    history["step"].append(step)
                    history["train_loss"].append(value)
                    running = value if running is None else 0.95 * running + 0.05 * value
                    # (the epoch's end saves anyway, after its validation loss)
                    if main and opts.save_every and step % opts.save_every == 0 and step % steps:
                        save()
                    progress.update(**{"loss": f"{running:.3f}",
                                       "chars/s": f"{chars / (time.perf_counter() - t0):,.0f}"})
            finally:
                progress.close()
            speed = chars / (time.perf_counter() - t0)
            if main:
                val = evaluate(model, val_data, seq_len, batch_size, device)
                history["val"].append([step, val])
                log(f"epoch {epoch}: train loss {running:.4f}, val loss {val:.4f}, {speed:,.0f} chars/s")
                save()
        signum, = distributed.agree([received[0] if received else 0], world, device)
        if signum:  # a signal during the last validation
            stop(signum)
    if main:
        log(f"checkpoint: {opts.checkpoint}")
        log(_draw_loss_curve(opts.checkpoint, history))
        log("sample:\n" + sample(model, opts.prime, opts.sample_chars, seed=run["seed"]))
    return model
