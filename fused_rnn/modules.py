"""Drop-in nn.Modules built on :func:`fused_rnn.fused_rnn`."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .function import fused_rnn


class FusedRNNLayer(nn.Module):
    """One layer of the recurrence, with the course's submodule names ``l_in`` and ``l_hidden``
    (and ``e`` for token input)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 vocab_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.e = nn.Embedding(vocab_size, input_size, **kw) if vocab_size is not None else None
        self.l_in = nn.Linear(input_size, hidden_size, bias=bias, **kw)
        self.l_hidden = nn.Linear(hidden_size, hidden_size, bias=bias, **kw)

    def forward(self, x, h0=None, backend="auto"):
        return fused_rnn(x, self.l_in.weight, self.l_in.bias, self.l_hidden.weight,
                         self.l_hidden.bias, h0, embedding=self.e.weight if self.e is not None else None,
                         backend=backend)


class FusedRNN(nn.Module):
    """A layer like ``torch.nn.RNN`` for ``h_t = tanh(W_h (h_{t-1} + relu(W_in x_t + b_in)) + b_h)``.

    Args:
        input_size: features of ``x`` (the embedding size when ``vocab_size`` is set).
        hidden_size: H.
        num_layers: stacked layers; each layer after the first reads the previous one's states.
        bias: biases in ``l_in`` and ``l_hidden``.
        batch_first: ``x`` is ``[B, T, ...]`` (default) rather than ``[T, B, ...]``.
        dropout: dropout on the outputs of every layer but the last, while training.
        vocab_size: token input: ``x`` holds ids in ``[0, vocab_size)`` and the first layer owns an
            embedding of ``input_size``.
        backend: see :func:`fused_rnn.fused_rnn`.

    ``forward(x, h0=None)`` returns ``(output [B, T, H], h_n [num_layers, B, H])``
    (``output`` is ``[T, B, H]`` when ``batch_first=False``).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0, vocab_size: Optional[int] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.vocab_size, self.backend = batch_first, dropout, vocab_size, backend
        self.layers = nn.ModuleList(
            FusedRNNLayer(input_size if i == 0 else hidden_size, hidden_size, bias,
                          vocab_size if i == 0 else None, device=device, dtype=dtype)
            for i in range(num_layers))

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        if h0 is not None and (h0.dim() != 3 or h0.shape[0] != self.num_layers):
            raise ValueError(f"h0 must be [num_layers={self.num_layers}, B, H], got {tuple(h0.shape)}")
        finals = []
        for i, layer in enumerate(self.layers):
            if i > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout)
            x, h_n = layer(x, None if h0 is None else h0[i], self.backend)
            finals.append(h_n)
        output = x if self.batch_first else x.transpose(0, 1)
        return output, torch.stack(finals)

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if self.vocab_size is not None:
            s += f", vocab_size={self.vocab_size}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s + f", backend={self.backend!r}"
