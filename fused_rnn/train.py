"""Train a char-level language model on real text, and sample from it.

The model predicts the next char at every step: an embedding, the fused recurrence
(:class:`fused_rnn.FusedRNN`), and a linear read-out. The default corpus is the Python standard
library's own source, read from the running interpreter's installation: no download needed.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modules import FusedRNN


class UserError(Exception):
    """A mistake in the command line, corpus or checkpoint: reported in one line, no traceback."""


@dataclass
class ModelConfig:
    vocab: str  # the characters, in id order
    n_fac: int = 42
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0


class CharLanguageModel(nn.Module):
    """Embedding -> fused recurrence -> linear: ``forward(x [B, T]) -> (logits [B, T, V], h_n)``."""

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        V = len(config.vocab)
        self.rnn = FusedRNN(config.n_fac, config.hidden_size, config.num_layers,
                            dropout=config.dropout, vocab_size=V, backend=backend)
        self.l_out = nn.Linear(config.hidden_size, V)

    def forward(self, x, h0=None):
        output, h_n = self.rnn(x, h0)
        return self.l_out(output), h_n


def default_corpus_files():
    """The standard library's .py files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def load_corpus(path=None, max_chars=2_000_000) -> str:
    if path is None:
        parts, total = [], 0
        for f in default_corpus_files():
            with open(f, encoding="utf-8", errors="replace") as fh:
                parts.append(fh.read())
            total += len(parts[-1])
            if total >= max_chars:
                break
        text = "\n".join(parts)
        if not text:
            raise UserError("the default corpus (the standard library's source) was not found")
    else:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise UserError(f"cannot read corpus {path!r}: {exc.strerror}") from None
        text = raw.decode("utf-8", errors="replace")
        # Each undecodable sequence became one U+FFFD; the file's own U+FFFD chars do not count.
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        if b"\0" in raw or bad > 0.01 * len(text):
            why = "it holds NUL bytes" if b"\0" in raw else f"{bad / len(text):.0%} of it is not valid UTF-8"
            raise UserError(f"corpus {path!r} is not a text file ({why})")
    text = text[:max_chars]
    if len(text) < 2:
        raise UserError(f"corpus {path or '(default)'} is empty")
    return text


def encode(text: str, vocab: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, generator) -> tuple:
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


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


@torch.no_grad()
def sample(model, prime: str, length: int, temperature: float = 0.8, seed: int = 0) -> str:
    """Generates ``length`` chars after ``prime``, carrying the state one char at a time."""
    vocab = model.config.vocab
    device = next(model.parameters()).device
    prime = "".join(c for c in prime if c in vocab) or vocab[0]
    g = torch.Generator().manual_seed(seed)
    model.eval()
    logits, h = model(encode(prime, vocab)[None].to(device))
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float().cpu() / max(temperature, 1e-4), dim=-1)
        c = torch.multinomial(probs, 1, generator=g)
        out.append(vocab[c.item()])
        logits, h = model(c[None].to(device), h)
    return prime + "".join(out)


def save_checkpoint(path, model, step, val_loss, **state):
    """Writes the checkpoint atomically: to a temporary file in the same folder, flushed to disk,
    then renamed over the old one, so a crash at any moment leaves the old or the new checkpoint,
    never a truncated one. ``state``: the training state that ``train --resume`` needs."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"config": asdict(model.config), "model": model.state_dict(), "step": step,
                        "val_loss": val_loss, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _not_a_model(path, exc) -> UserError:
    first = (str(exc).strip().splitlines() or [""])[0]
    return UserError(f"checkpoint {path!r} is not a fused_rnn char model ({type(exc).__name__}: {first})")


def read_checkpoint(path, device="cpu") -> dict:
    """The checkpoint's dict; UserError for a missing or damaged file."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path!r} not found") from None
    except Exception as exc:  # unpickling errors, truncated files
        raise _not_a_model(path, exc) from None
    if not isinstance(ckpt, dict):
        raise _not_a_model(path, TypeError(f"holds a {type(ckpt).__name__}, not a dict"))
    return ckpt


def load_checkpoint(path, device="cpu", backend="auto") -> CharLanguageModel:
    ckpt = read_checkpoint(path, device)
    try:
        model = CharLanguageModel(ModelConfig(**ckpt["config"]), backend=backend)
        model.load_state_dict(ckpt["model"])
    except Exception as exc:  # missing keys, shape mismatches
        raise _not_a_model(path, exc) from None
    return model.to(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None


def _distributed_setup(device_name: str):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after saving a checkpoint; ``status``: 128 + signal."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


# The options that define a run. `train --resume` takes them from the checkpoint, and one given
# again must agree with it; --epochs (the total), devices, backend and output options may change.
RUN_DEFAULTS = dict(corpus=None, max_chars=2_000_000, seq_len=64, n_fac=42, hidden_size=256,
                    num_layers=1, dropout=0.0, batch_size=64, steps=400, lr=3e-3, seed=0)


def _run_options(opts, ckpt=None) -> dict:
    given = {k: getattr(opts, k) for k in RUN_DEFAULTS if hasattr(opts, k)}
    if given.get("corpus") is not None:
        given["corpus"] = os.path.abspath(given["corpus"])  # a resume may run from another folder
    if ckpt is None:
        return {**RUN_DEFAULTS, **given}
    if "run" not in ckpt:
        raise UserError(f"checkpoint {opts.checkpoint!r} holds no training state to resume "
                        f"(saved by an older version); start a new run")
    run = {**RUN_DEFAULTS, **ckpt["run"]}
    for k, v in given.items():
        if v != run[k]:
            raise UserError(f"--{k.replace('_', '-')} {v} conflicts with the checkpoint's {run[k]} "
                            f"(--resume continues its run: leave the option out)")
    return run


def _step_seed(seed, rank, step) -> int:
    """The random state of one step, a function of (seed, rank, step) only: a resumed run draws
    the same windows and dropout masks as one that never stopped."""
    return hash((seed, rank, step)) & (2**63 - 1)


@contextlib.contextmanager
def _stop_requests():
    """Turns the first SIGINT or SIGTERM into a request to stop (a list that gets the signal
    number; the training loop saves and exits between steps). A second one kills the process at
    once: the handlers go back to the default action."""
    received = []

    def handler(signum, frame):
        received.append(signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _agreed_signal(received, world, device) -> int:
    """The signal that stops training (0: none). Under torchrun every process must stop at the
    same step, or the others would wait forever in the next gradient all-reduce."""
    signum = received[0] if received else 0
    if world > 1:
        flag = torch.tensor([signum], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item())
        _wait_until_released(flag)
    return signum


def _wait_until_released(tensor, timeout=10.0):
    """Waits (bounded) until a finished collective holds no more references to ``tensor``. Gloo's
    worker thread drops its reference a moment after ``all_reduce`` returns, and freeing a tensor
    made in Python needs the GIL: had the interpreter begun shutting down by then (the last
    collective before exit), that thread would abort the process."""
    deadline = time.monotonic() + timeout
    while tensor._use_count() > 1 and time.monotonic() < deadline:
        time.sleep(1e-4)


class Progress:
    """tqdm's bar on a terminal; elsewhere (a log file, CI) a plain line every few seconds, so
    that logs hold no carriage returns."""

    def __init__(self, total, desc, enabled, initial=0, interval=5.0):
        self.total, self.desc, self.n, self.interval = total, desc, initial, interval
        self.enabled, self.last = enabled, time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0)

    def update(self, **stats):
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(stats, refresh=False)
            self.bar.update()
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            print(f"{self.desc}: step {self.n}/{self.total}, " + ", ".join(f"{k} {v}" for k, v in stats.items()),
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def loss_curve_path(checkpoint: str) -> str:
    return (checkpoint[:-3] if checkpoint.endswith(".pt") else checkpoint) + "_loss.png"


def _draw_loss_curve(checkpoint, history) -> str:
    """The line that says where the loss curve went, or why it was not drawn."""
    try:
        from .inspection import save_loss_curve

        return f"loss curve: {save_loss_curve(loss_curve_path(checkpoint), history)}"
    except ImportError:
        return 'loss curve: not drawn (pip install -e ".[viz]" for matplotlib)'


def train(opts) -> CharLanguageModel:
    """Runs the training described by the parsed command-line options ``opts``. Under torchrun,
    each process trains on its own random windows with DistributedDataParallel; rank 0 reports,
    evaluates, samples and saves. Raises :class:`Interrupted` after saving on SIGINT/SIGTERM."""
    rank, world, device = _distributed_setup(opts.device)
    try:
        return _train(opts, rank, world, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _train(opts, rank, world, device):
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    ckpt = read_checkpoint(opts.checkpoint, device) if opts.resume else None
    run = _run_options(opts, ckpt)
    text = load_corpus(run["corpus"], run["max_chars"])
    vocab = ckpt["config"]["vocab"] if ckpt else "".join(sorted(set(text)))
    data = encode(text, vocab)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    seq_len, batch_size, steps = run["seq_len"], run["batch_size"], run["steps"]
    if len(val_data) <= seq_len + 1 or len(train_data) <= seq_len + 1:
        raise UserError(f"corpus too short ({len(data)} chars) for --seq-len {seq_len}")
    config = ModelConfig(vocab, run["n_fac"], run["hidden_size"], run["num_layers"], run["dropout"])
    torch.manual_seed(run["seed"])  # the same initial weights in every process
    model = CharLanguageModel(config, backend=opts.backend).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=run["lr"])
    step, history = 0, {"step": [], "train_loss": [], "val": []}
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, history = ckpt["step"], ckpt["history"]
        except Exception as exc:  # a damaged or foreign training state
            raise _not_a_model(opts.checkpoint, exc) from None
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    log(f"corpus: {run['corpus'] or 'Python standard library source'}, {len(data):,} chars, "
        f"vocab {len(vocab)}; model: hidden {config.hidden_size} x {config.num_layers} layer(s), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; device {device}"
        f"{f' x {world} processes' if world > 1 else ''}, backend {opts.backend}")
    if ckpt:
        log(f"resumed from {opts.checkpoint} at step {step} (epoch {step // steps + 1}, "
            f"step {step % steps} of {steps})")
    elif main:
        val = evaluate(model, val_data, seq_len, batch_size, device)
        history["val"].append([0, val])
        log(f"epoch 0: val loss {val:.4f} (uniform guess: {math.log(len(vocab)):.4f})")

    def save():
        save_checkpoint(opts.checkpoint, model, step, history["val"][-1][1] if history["val"] else None,
                        optimizer=optimizer.state_dict(), run=run, history=history)

    with _stop_requests() as received:

        def stop_if_asked(progress=None):
            signum = _agreed_signal(received, world, device)
            if signum:
                if progress is not None:
                    progress.close()
                if main:
                    save()
                    log(f"stopped by {signal.Signals(signum).name} at step {step}: "
                        f"checkpoint saved to {opts.checkpoint}")
                raise Interrupted(128 + signum)

        for epoch in range(step // steps + 1, opts.epochs + 1):
            progress = Progress(steps, f"epoch {epoch}/{opts.epochs}", main, initial=step % steps)
            t0, chars, running = time.perf_counter(), 0, None
            try:
                while step < epoch * steps:
                    stop_if_asked(progress)
                    torch.manual_seed(_step_seed(run["seed"], rank, step))
                    x, y = random_windows(train_data, batch_size, seq_len, None)
                    x, y = x.to(device), y.to(device)
                    logits, _ = net(x)
                    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    step += 1
                    chars += x.numel() * world
                    value = loss.item()
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
        stop_if_asked()  # a signal during the last validation
    if main:
        log(f"checkpoint: {opts.checkpoint}")
        log(_draw_loss_curve(opts.checkpoint, history))
        log("sample:\n" + sample(model, opts.prime, opts.sample_chars, seed=run["seed"]))
    return model
