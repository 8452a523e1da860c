"""Train a char-level language model on real text, and sample from it.

The model predicts the next char at every step: an embedding, the fused recurrence
(:class:`fused_rnn.FusedRNN`), and a linear read-out. The default corpus is the Python standard
library's own source, read from the running interpreter's installation: no download needed.
"""
from __future__ import annotations

import math
import os
import sysconfig
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
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            raise UserError(f"cannot read corpus {path!r}: {exc.strerror}") from None
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


def save_checkpoint(path, model, step, val_loss):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"config": asdict(model.config), "model": model.state_dict(), "step": step,
                "val_loss": val_loss}, path)


def load_checkpoint(path, device="cpu", backend="auto") -> CharLanguageModel:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = CharLanguageModel(ModelConfig(**ckpt["config"]), backend=backend)
        model.load_state_dict(ckpt["model"])
    except FileNotFoundError:
        raise UserError(f"checkpoint {path!r} not found") from None
    except Exception as exc:  # unpickling errors, missing keys, shape mismatches
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint {path!r} is not a fused_rnn char model "
                        f"({type(exc).__name__}: {first})") from None
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


def train(opts) -> CharLanguageModel:
    """Runs the training described by the parsed command-line options ``opts``. Under torchrun,
    each process trains on its own random windows with DistributedDataParallel; rank 0 reports,
    evaluates, samples and saves."""
    from tqdm import tqdm

    rank, world, device = _distributed_setup(opts.device)
    try:
        return _train(opts, rank, world, device, tqdm)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _train(opts, rank, world, device, tqdm):
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    torch.manual_seed(opts.seed)  # the same initial weights in every process
    text = load_corpus(opts.corpus, opts.max_chars)
    vocab = "".join(sorted(set(text)))
    data = encode(text, vocab)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    if len(val_data) <= opts.seq_len + 1 or len(train_data) <= opts.seq_len + 1:
        raise UserError(f"corpus too short ({len(data)} chars) for --seq-len {opts.seq_len}")
    config = ModelConfig(vocab, opts.n_fac, opts.hidden_size, opts.num_layers, opts.dropout)
    model = CharLanguageModel(config, backend=opts.backend).to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    g = torch.Generator().manual_seed(opts.seed + rank)  # each process its own windows
    log(f"corpus: {opts.corpus or 'Python standard library source'}, {len(data):,} chars, "
        f"vocab {len(vocab)}; model: hidden {opts.hidden_size} x {opts.num_layers} layer(s), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; device {device}"
        f"{f' x {world} processes' if world > 1 else ''}, backend {opts.backend}")
    if main:
        log(f"epoch 0: val loss {evaluate(model, val_data, opts.seq_len, opts.batch_size, device):.4f} "
            f"(uniform guess: {math.log(len(vocab)):.4f})")
    step = 0
    for epoch in range(1, opts.epochs + 1):
        bar = tqdm(range(opts.steps), desc=f"epoch {epoch}/{opts.epochs}", dynamic_ncols=True,
                   mininterval=1.0, disable=not main)
        t0, chars, running = time.perf_counter(), 0, None
        for _ in bar:
            x, y = random_windows(train_data, opts.batch_size, opts.seq_len, g)
            x, y = x.to(device), y.to(device)
            logits, _ = net(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            chars += x.numel() * world
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", chars_per_s=f"{chars / (time.perf_counter() - t0):,.0f}",
                            refresh=False)
        bar.close()
        if main:
            val = evaluate(model, val_data, opts.seq_len, opts.batch_size, device)
            log(f"epoch {epoch}: train loss {running:.4f}, val loss {val:.4f}")
            save_checkpoint(opts.checkpoint, model, step, val)
    if main:
        log(f"checkpoint: {opts.checkpoint}")
        log("sample:\n" + sample(model, opts.prime, opts.sample_chars, seed=opts.seed))
    return model
