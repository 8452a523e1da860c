"""The text a model learns from: reading a corpus (or the default one), ids, random windows.

The default corpus is the Python standard library's own source, read from the running
interpreter's installation: no download needed.
"""
from __future__ import annotations

import os
import sysconfig

import torch

from .errors import UserError


def default_corpus_files():
    """The standard library's .py files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def load_corpus(path=None, max_chars=2_000_000) -> str:
    """The corpus text (at most ``max_chars``); UserError for a missing, empty or non-text file.
    A UTF-8 byte-order mark at the start of a file is not text and is dropped."""
    if path is None:
        parts, total = [], 0
        for f in default_corpus_files():
            with open(f, encoding="utf-8-sig", errors="replace") as fh:
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
        text = raw.decode("utf-8-sig", errors="replace")
        # Each undecodable sequence became one U+FFFD; the file's own U+FFFD chars do not count.
        bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        if b"\0" in raw or bad > 0.01 * len(text):
            why = "it holds NUL bytes" if b"\0" in raw else f"{bad / len(text):.0%} of it is not valid UTF-8"
            raise UserError(f"corpus {path!r} is not a text file ({why})")
    text = text[:max_chars]
    if not text:
        raise UserError(f"corpus {path or '(default)'} is empty")
    return text


def unknown_chars(text: str, vocab: str) -> list:
    """The distinct chars of ``text`` that are not in ``vocab``, sorted."""
    return sorted(set(text) - set(vocab))


def describe_chars(chars, limit: int = 10) -> str:
    """``'a', 'é', ...``: a short, one-line list of chars."""
    return ", ".join(repr(c) for c in chars[:limit]) + (", ..." if len(chars) > limit else "")


def encode(text: str, vocab: str) -> torch.Tensor:
    """Token ids ``[N]`` of the chars of ``text`` that are in ``vocab`` (the others are skipped)."""
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text if c in index], dtype=torch.long)


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, generator) -> tuple:
    """``(x [B, T], y [B, T])``: random windows of ``data`` and the same windows one char on."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]
