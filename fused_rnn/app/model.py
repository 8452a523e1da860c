"""The char language model: embedding -> fused recurrence -> linear read-out, and its config.

The recurrence is the course's cell (`FusedRNN`, token input) or one of torch's cells on its
fused twin (`RNN`, `LSTM`, `GRU`, behind an embedding), so that the cells can be trained and
compared on the same text."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import GRU, LSTM, RNN, cells
from ..modules import FusedRNN

# --cell: the course's cell, or a torch cell by its fused twin
TWINS = {"elman": RNN, cells.LSTM.name: LSTM, cells.GRU.name: GRU}
MODEL_CELLS = (cells.COURSE.name, *TWINS)


@dataclass
class ModelConfig:
    vocab: str  # the characters, in id order
    n_fac: int = 42
    hidden_size: int = 256
    num_layers: int = 1
    dropout: float = 0.0
    cell: str = cells.COURSE.name  # one of MODEL_CELLS (checkpoints saved before --cell: the course's)

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        """The config saved in a checkpoint; TypeError or ValueError when it is damaged."""
        if not isinstance(d, dict):
            raise TypeError(f"the config is a {type(d).__name__}, not a dict")
        config = cls(**d)  # TypeError for a missing or unknown key
        if not isinstance(config.vocab, str) or not config.vocab or len(set(config.vocab)) != len(config.vocab):
            raise ValueError(f"the vocabulary must be a non-empty str of distinct chars, got {config.vocab!r:.40}")
        for name in ("n_fac", "hidden_size", "num_layers"):
            value = getattr(config, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if config.cell not in MODEL_CELLS:
            raise ValueError(f"cell must be one of {MODEL_CELLS}, got {config.cell!r:.40}")
        if type(config.dropout) not in (int, float) or not 0 <= config.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {config.dropout!r}")
        return config


class CharLanguageModel(nn.Module):
    """Embedding -> fused recurrence -> linear: ``forward(x [B, T]) -> (logits [B, T, V], h_n)``
    (``h_n`` a tuple ``(h_n, c_n)`` for the LSTM)."""

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        V = len(config.vocab)
        # dropout acts between stacked layers; with one layer the command line has said so once
        dropout = config.dropout if config.num_layers > 1 else 0.0
        if config.cell == cells.COURSE.name:  # the embedding is the course layer's own
            self.embedding = None
            self.rnn = FusedRNN(config.n_fac, config.hidden_size, config.num_layers,
                                dropout=dropout, vocab_size=V, backend=backend)
        else:
            self.embedding = nn.Embedding(V, config.n_fac)
            self.rnn = TWINS[config.cell](config.n_fac, config.hidden_size, config.num_layers, dropout=dropout,
                                          batch_first=True, backend=backend)
        self.l_out = nn.Linear(config.hidden_size, V)

    def forward(self, x, h0=None):
        output, h_n = self.rnn(x if self.embedding is None else self.embedding(x), h0)
        return self.l_out(output), h_n

    @classmethod
    def from_course_model(cls, course_model: nn.Module, vocab: str, backend: str = "auto") -> "CharLanguageModel":
        """This model with the weights of a course-style ``CharLoopModel`` (submodules ``e``,
        ``l_in``, ``l_hidden``, ``l_out``): the same function, with a prediction after every char."""
        e, l_hidden = course_model.e, course_model.l_hidden
        if e.num_embeddings != len(vocab):
            raise ValueError(f"the vocabulary has {len(vocab)} chars, the model's embedding {e.num_embeddings}")
        model = cls(ModelConfig(vocab, e.embedding_dim, l_hidden.out_features), backend=backend)
        layer = model.rnn.layers[0]
        for mine, theirs in [(layer.e, e), (layer.l_in, course_model.l_in), (layer.l_hidden, l_hidden),
                             (model.l_out, course_model.l_out)]:
            mine.load_state_dict(theirs.state_dict())
        return model.to(l_hidden.weight.device, l_hidden.weight.dtype).train(course_model.training)


def fresh_model(model: CharLanguageModel, seed: int = 0) -> CharLanguageModel:
    """A freshly initialised model of the same shape (the same config and backend)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CharLanguageModel(model.config, backend=model.rnn.backend).to(model.l_out.weight.dtype).eval()


def non_finite_parameters(model: nn.Module) -> list:
    """The names of the parameters that hold a NaN or an infinity (a diverged run's weights)."""
    with torch.no_grad():
        return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
