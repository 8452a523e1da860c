"""Twins of ``torch.nn.LSTM``, ``GRU``, ``LSTMCell`` and ``GRUCell`` on :func:`fused_rnn.lstm`
and :func:`fused_rnn.gru`, and the table of every torch module with a twin (``TWINS``).

Each computes exactly what torch's module computes, with the same constructor, parameter names,
initialisation, ``state_dict``, ``forward`` and errors; only the recurrence runs on the fused
kernels. The sequence twins share :class:`fused_rnn.rnn.StackedRNNBase` (layers, directions,
packed input, dropout) with :class:`fused_rnn.RNN`; each says what state it carries and how one
layer-direction runs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .dispatch import check_backend
from .function import gru, lstm
from .reference import gru_reference, lstm_reference
from .rnn import _NOT_GIVEN, RNN, RNNCell, StackedRNNBase, cell_from_torch, check_cell_args, mismatch_with


def _lstm_layer(x, w: dict, state, lengths, backend):
    """One layer-direction of the LSTM on ``x [B, T, I]`` with weights ``w`` by kind (see
    ``StackedRNNBase._layer_weights``): ``(output, (h_n, c_n))``. An empty batch or hidden size
    (``nn.LSTMCell`` allows it) has nothing to fuse and the fused function refuses it: the
    reference loop gives torch's empty results, on every backend."""
    h0, c0 = (None, None) if state is None else state
    args = (x, w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"), h0, c0, w.get("weight_hr"))
    if x.shape[0] == 0 or w["weight_hh"].shape[0] == 0:
        return lstm_reference(*args)
    return lstm(*args, lengths=lengths, backend=backend)


def _gru_layer(x, w: dict, h0, lengths, backend):
    """One layer-direction of the GRU on ``x [B, T, I]``: ``(output, h_n)``; empty results as
    :func:`_lstm_layer`'s."""
    args = (x, w["weight_ih"], w["weight_hh"], w.get("bias_ih"), w.get("bias_hh"), h0)
    if x.shape[0] == 0 or w["weight_hh"].shape[0] == 0:
        return gru_reference(*args)
    return gru(*args, lengths=lengths, backend=backend)


class LSTM(StackedRNNBase):
    """``torch.nn.LSTM`` on the fused kernels: a drop-in twin, ``proj_size`` included.

    Same constructor, parameters (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``,
    ``bias_hh_l0``, ``weight_hr_l0`` with ``proj_size``, ..., ``..._reverse``), initialisation,
    ``state_dict`` keys, repr, ``forward`` (``[T, B, I]``, ``[B, T, I]`` with ``batch_first``,
    unbatched ``[T, I]``, or a ``PackedSequence``, and ``hx = (h_0, c_0)`` or None; returns
    ``(output, (h_n [L*D, B, P], c_n [L*D, B, H]))``, ``P`` = ``proj_size`` or ``hidden_size``)
    and errors as ``torch.nn.LSTM``; see its documentation. Outputs and gradients equal torch's to
    rounding. Extra keyword ``backend``: see :func:`fused_rnn.lstm`. ``LSTM.from_torch(module)``
    wraps an existing ``nn.LSTM``'s own parameters.

    It shares ``nn.RNNBase`` with ``nn.LSTM`` but is not an ``nn.LSTM`` instance: ``torch.compile``
    refuses to trace those, and traces this one. ``flatten_parameters()`` is a no-op. In training
    mode, dropout between layers draws the same masks as ``nn.LSTM`` from the same seed on the CPU
    for unpacked input; elsewhere masks of the same distribution.
    """

    torch_class = nn.LSTM  # the torch module it twins

    _DIM_ERROR = "LSTM: Expected input to be 2D or 3D, got {}D instead"
    _STATE_MESSAGES = ("Expected hidden[0] size {}, got {}", "Expected hidden[1] size {}, got {}")
    _PACKED_CHECKED = False  # torch's LSTM leaves packed input to ATen (RuntimeErrors)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None, *, backend: str = "auto"):
        check_backend(backend)
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self.backend = backend

    @staticmethod
    def _torch_config(module: nn.LSTM) -> dict:
        return dict(StackedRNNBase._torch_config(module), proj_size=module.proj_size)

    def _state_sizes(self) -> tuple:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _state_parts(self, hx) -> tuple:
        return (hx[0], hx[1])

    def _result_state(self, parts: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
        return (parts[0], parts[1])

    def _run_layer(self, x, k, state, lengths):
        out, (h_n, c_n) = _lstm_layer(x, self._layer_weights(k), state, lengths, self.backend)
        return out, (h_n, c_n)


class GRU(StackedRNNBase):
    """``torch.nn.GRU`` on the fused kernels: a drop-in twin.

    Same constructor, parameters, initialisation, ``state_dict`` keys, repr, ``forward`` (the
    input forms of :class:`LSTM`, ``hx = h_0`` or None; returns ``(output, h_n [L*D, B, H])``) and
    errors as ``torch.nn.GRU``. Extra keyword ``backend``: see :func:`fused_rnn.gru`;
    ``GRU.from_torch(module)`` wraps an existing ``nn.GRU``'s own parameters. The keyword
    ``proj_size`` raises torch's ValueError, whatever its value, as ``nn.GRU`` does. Not an
    ``nn.GRU`` instance (``torch.compile`` traces it); dropout between layers as :class:`LSTM`'s.
    """

    torch_class = nn.GRU  # the torch module it twins

    _DIM_ERROR = "GRU: Expected input to be 2D or 3D, got {}D instead"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, proj_size=_NOT_GIVEN, backend: str = "auto"):
        if proj_size is not _NOT_GIVEN:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        check_backend(backend)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self.backend = backend

    def _run_layer(self, x, k, state, lengths):
        out, h_n = _gru_layer(x, self._layer_weights(k), None if state is None else state[0], lengths,
                              self.backend)
        return out, (h_n,)


def _cell_weights(cell: nn.RNNCellBase) -> dict:
    return dict(weight_ih=cell.weight_ih, weight_hh=cell.weight_hh, bias_ih=cell.bias_ih, bias_hh=cell.bias_hh)


class _GatedCellTwin:
    """The gated cells' shared constructor (torch's, plus ``backend``) and ``from_torch``; mixed in
    before torch's cell class, whose ``__init__`` it calls."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        check_backend(backend)
        super().__init__(input_size, hidden_size, bias, device, dtype)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.RNNCellBase, backend: str = "auto"):
        """The twin of ``module`` (a ``cls.torch_class``) holding its very Parameter objects and
        its training mode."""
        return cell_from_torch(cls, module, backend)


class LSTMCell(_GatedCellTwin, nn.LSTMCell):
    """``torch.nn.LSTMCell`` on the fused kernels: a drop-in twin.

    Same constructor, parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``),
    initialisation, ``state_dict``, repr, ``forward(input [B, I] or [I], hx=None or (h, c)) ->
    (h', c')`` and errors as ``torch.nn.LSTMCell``, plus the keyword ``backend`` (see
    :func:`fused_rnn.lstm`). ``LSTMCell.from_torch(module)`` wraps an existing cell's own
    parameters. A loop of single steps gains little from fusion: where the whole sequence is at
    hand, :class:`LSTM` runs all of its steps in one call.
    """

    torch_class = nn.LSTMCell  # the torch module it twins

    def forward(self, input: torch.Tensor, hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        elif hx is not None and (isinstance(hx, torch.Tensor) or len(hx) != 2):
            if isinstance(hx, torch.Tensor):
                raise TypeError("lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not Tensor")
            raise RuntimeError("lstm_cell expects two hidden states")
        check_cell_args(self, input, () if hx is None else tuple(hx))
        _, (h, c) = _lstm_layer(input.unsqueeze(1), _cell_weights(self), hx, None, self.backend)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_GatedCellTwin, nn.GRUCell):
    """``torch.nn.GRUCell`` on the fused kernels: a drop-in twin: the constructor, parameters,
    ``state_dict``, ``forward(input [B, I] or [I], hx=None) -> h'`` and errors of
    ``torch.nn.GRUCell``, plus the keyword ``backend`` (see :func:`fused_rnn.gru`);
    ``GRUCell.from_torch(module)`` wraps an existing cell's own parameters.
    """

    torch_class = nn.GRUCell  # the torch module it twins

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
            hx = None if hx is None else hx.unsqueeze(0)
        check_cell_args(self, input, () if hx is None else (hx,))
        _, h = _gru_layer(input.unsqueeze(1), _cell_weights(self), hx, None, self.backend)
        return h if batched else h.squeeze(0)


# torch's recurrent module classes -> their fused twins: what from_torch and convert() swap.
TWINS: Dict[type, type] = {nn.RNN: RNN, nn.RNNCell: RNNCell, nn.LSTM: LSTM, nn.LSTMCell: LSTMCell,
                           nn.GRU: GRU, nn.GRUCell: GRUCell}


def _torch_kind(module: nn.Module) -> Optional[type]:
    return next((kind for kind in TWINS if isinstance(module, kind)), None)


def torch_rnn_mismatch(module: nn.Module) -> Optional[str]:
    """None when ``module`` is a torch recurrent module (``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` or
    one of their cells) that its fused twin can replace exactly; else why not."""
    if isinstance(module, tuple(TWINS.values())):
        return "it is fused already"
    kind = _torch_kind(module)
    if kind is None:
        names = ", ".join(f"torch.nn.{k.__name__}" for k in TWINS)
        return f"{type(module).__name__} has no fused twin: only {names} have one"
    return mismatch_with(module, kind)


def from_torch(module: nn.Module, backend: str = "auto") -> nn.Module:
    """The fused twin of a torch recurrent module (see :data:`TWINS`), holding the same Parameter
    objects; TypeError saying why for anything else."""
    kind = _torch_kind(module)
    if kind is None:
        raise TypeError(f"from_torch takes a torch recurrent module: {torch_rnn_mismatch(module)}")
    return TWINS[kind].from_torch(module, backend)
