"""Drop-in nn.Modules built on :func:`fused_rnn.fused_rnn` (``convert`` is in fused_rnn/convert.py)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import check_backend
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

    def forward(self, x, h0=None, lengths=None, backend="auto"):
        return fused_rnn(x, self.l_in.weight, self.l_in.bias, self.l_hidden.weight,
                         self.l_hidden.bias, h0, embedding=self.e.weight if self.e is not None else None,
                         lengths=lengths, backend=backend)


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
        backend: see :func:`fused_rnn.fused_rnn`; an unknown one raises ``ValueError`` here.

    ``forward(x, h0=None, lengths=None)`` returns ``(output [B, T, H], h_n [num_layers, B, H])``
    (``output`` is ``[T, B, H]`` when ``batch_first=False``). ``lengths [B]`` gives each padded
    sequence's length: outputs past it are zeros and ``h_n`` is the state at its last valid step.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0, vocab_size: Optional[int] = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if dropout > 0 and num_layers == 1:  # as torch.nn.RNN warns
            warnings.warn(f"dropout acts between stacked layers, so dropout={dropout} does nothing "
                          f"with num_layers=1", stacklevel=2)
        check_backend(backend)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.dropout, self.vocab_size, self.backend = batch_first, dropout, vocab_size, backend
        self.layers = nn.ModuleList(
            FusedRNNLayer(input_size if i == 0 else hidden_size, hidden_size, bias,
                          vocab_size if i == 0 else None, device=device, dtype=dtype)
            for i in range(num_layers))

    def forward(self, x: torch.Tensor, h0: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None):
        if not self.batch_first:
            x = x.transpose(0, 1)
        if h0 is not None and (h0.dim() != 3 or h0.shape[0] != self.num_layers):
            raise ValueError(f"h0 must be [num_layers={self.num_layers}, B, H], got {tuple(h0.shape)}")
        finals = []
        for i, layer in enumerate(self.layers):
            if i > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout)
            x, h_n = layer(x, None if h0 is None else h0[i], lengths, self.backend)
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


class FusedCharLoopModel(nn.Module):
    """The course's ``CharLoopModel`` on the fused recurrence: same constructor, submodules
    (``e``, ``l_in``, ``l_hidden``, ``l_out``) and state-dict keys, same outputs to fp32 rounding.

    ``forward(*cs)`` takes one LongTensor ``[B]`` per step, as the course's model does, or
    ``forward(x)`` takes ``x [B, T]``; both return ``log_softmax`` scores ``[B, vocab_size]`` for
    the char after the last one (after each sequence's last valid char, given ``lengths=[B]``).
    """

    def __init__(self, vocab_size: int, n_fac: int, n_hidden: int, backend: str = "auto"):
        super().__init__()
        self.e = nn.Embedding(vocab_size, n_fac)
        self.l_in = nn.Linear(n_fac, n_hidden)
        self.l_hidden = nn.Linear(n_hidden, n_hidden)
        self.l_out = nn.Linear(n_hidden, vocab_size)
        self.backend = check_backend(backend)

    def forward(self, *cs: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not cs:
            raise TypeError("forward() needs the chars: one [B] tensor per step, or x [B, T]")
        x = cs[0] if len(cs) == 1 and cs[0].dim() == 2 else torch.stack(cs, dim=1)
        _, h_n = fused_rnn(x, self.l_in.weight, self.l_in.bias, self.l_hidden.weight,
                           self.l_hidden.bias, embedding=self.e.weight, lengths=lengths,
                           backend=self.backend)
        return F.log_softmax(self.l_out(h_n), dim=-1)

    @classmethod
    def from_course_model(cls, model: nn.Module, backend: str = "auto") -> "FusedCharLoopModel":
        """The fused model holding ``model``'s own submodules (so its parameters, device, dtype
        and any optimizer that holds them carry over) and training mode."""
        problem = course_model_mismatch(model)
        if problem:
            raise ValueError(f"{type(model).__name__} is not a course-style CharLoopModel: {problem}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.e, fused.l_in, fused.l_hidden, fused.l_out = model.e, model.l_in, model.l_hidden, model.l_out
        fused.backend = check_backend(backend)
        fused.training = model.training  # not .train(): that would reset the submodules' own modes
        return fused


def course_model_mismatch(model: nn.Module) -> Optional[str]:
    """None when ``model`` holds exactly the course model's four submodules, with consistent
    shapes and nothing the fused model would drop or ignore; else what is wrong."""
    kinds = {"e": nn.Embedding, "l_in": nn.Linear, "l_hidden": nn.Linear, "l_out": nn.Linear}
    for name, kind in kinds.items():
        sub = getattr(model, name, None)
        if not isinstance(sub, kind):
            return f"its submodule {name!r} is {type(sub).__name__ if sub is not None else 'missing'}, not {kind.__name__}"
        if type(sub).forward is not kind.forward:
            return f"its submodule {name!r} ({type(sub).__name__}) overrides {kind.__name__}.forward"
        if any(getattr(sub, h) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                         "_backward_pre_hooks")):
            return f"its submodule {name!r} has hooks, which the fused model would not call"
    extra = [name for name in model._modules if name not in kinds]
    if extra:
        return f"it has submodules beyond e, l_in, l_hidden, l_out ({', '.join(extra)}), which the fused model would drop"
    own = [name for name, _ in [*model.named_parameters(recurse=False), *model.named_buffers(recurse=False)]]
    if own:
        return f"it holds its own parameters or buffers ({', '.join(own)}), which the fused model would drop"
    e, l_in, l_hidden, l_out = model.e, model.l_in, model.l_hidden, model.l_out
    options = {"padding_idx": e.padding_idx, "max_norm": e.max_norm,
               "scale_grad_by_freq": e.scale_grad_by_freq or None, "sparse": e.sparse or None}
    used = [f"{k}={v}" for k, v in options.items() if v is not None]
    if used:
        return f"its embedding sets {', '.join(used)}, which the fused model ignores"
    H = l_hidden.out_features
    checks = [(l_in.in_features == e.embedding_dim, "l_in.in_features != e.embedding_dim"),
              (l_in.out_features == H, "l_in.out_features != l_hidden.out_features"),
              (l_hidden.in_features == H, "l_hidden is not square"),
              (l_out.in_features == H, "l_out.in_features != l_hidden.out_features"),
              (l_out.out_features == e.num_embeddings, "l_out.out_features != e.num_embeddings")]
    for ok, what in checks:
        if not ok:
            return what
    return None
